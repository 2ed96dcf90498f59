//! Residency: what of the agent's memory stays resident once it has started.
//!
//! Starting runs a lot of code once — the command line, the mesh file's YAML and serde layers,
//! certificates, the log filter's regexes, the Kubernetes client's set-up — and the kernel keeps
//! every page of it mapped, and counted in the process's RSS, until the process ends. It
//! faults code in 64 KiB at a time, so these pages are most of an idle agent's RSS.
//!
//! Once the agent is ready, [`release_startup_pages`] drops the agent's mappings of its files'
//! pages that it never wrote (the binary's code and read-only data, and the shared
//! libraries'). The pages stay in the page cache: whatever runs again is mapped back on its
//! first touch, a minor fault, and what only ran at start stays out of RSS and is reclaimable.
//! glibc's heap (the C libraries' allocations) gives back what start-up freed, too.

use std::io;

/// What [`release_startup_pages`] dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings whose pages were dropped.
    pub mappings: usize,
    /// Their resident size before, bytes.
    pub bytes: u64,
}

/// One mapping of `/proc/self/smaps`, with the fields that decide whether it can be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: u64,
    anonymous_kib: u64,
}

impl Mapping<'_> {
    /// Read-only pages of a file that the process never wrote: dropping them loses nothing,
    /// because the file still holds exactly what they contain. A mapping that was ever
    /// written (relocations before RELRO made them read-only) has anonymous pages, and is
    /// kept.
    fn releasable(&self) -> bool {
        let perms = self.perms.as_bytes();
        self.path.starts_with('/')
            && perms.first() == Some(&b'r')
            && perms.get(1) == Some(&b'-')
            && self.anonymous_kib == 0
            && self.rss_kib > 0
    }
}

/// The mappings of an smaps text; a line it cannot read ends the list.
fn mappings(smaps: &str) -> Vec<Mapping<'_>> {
    let mut all: Vec<Mapping<'_>> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            let Some(last) = all.last_mut() else { break };
            let kib: Option<u64> = fields.next().and_then(|v| v.parse().ok());
            match key {
                "Rss" => last.rss_kib = kib.unwrap_or(0),
                // Unreadable counts as written: the mapping is kept.
                "Anonymous" => last.anonymous_kib = kib.unwrap_or(u64::MAX),
                _ => {}
            }
            continue;
        }
        let Some((start, end)) = first.split_once('-') else {
            break;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            break;
        };
        let perms = fields.next().unwrap_or("");
        // After offset, device and inode comes the path, which may hold spaces or be absent.
        let mut path = line;
        for _ in 0..5 {
            path = path.trim_start();
            path = path.find(' ').map_or("", |i| &path[i..]);
        }
        let path = path.trim();
        all.push(Mapping {
            start,
            end,
            perms,
            path,
            rss_kib: 0,
            // Unknown until its line is read: kept unless the kernel says there are none.
            anonymous_kib: u64::MAX,
        });
    }
    all
}

/// Drops the pages of the process's read-only file mappings that it never wrote, and returns
/// glibc's free heap memory to the kernel. Call it once the agent has started: code that runs
/// again comes back on its first touch.
///
/// Threads may be running meanwhile: a thread that touches a dropped page takes a fault and
/// reads the same bytes from the page cache.
// Never inlined: `hot-symbols.sh` has callgrind dump its counts on entry, to tell start-up
// from what a ready agent runs.
#[inline(never)]
pub fn release_startup_pages() -> io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for m in mappings(&smaps).iter().filter(|m| m.releasable()) {
        // SAFETY: the range is a whole mapping of this process, read-only and backed by a file,
        // with no page the process wrote: after MADV_DONTNEED every page reads back the same
        // bytes from the file, so no memory that Rust code can observe changes. The loader
        // unmaps nothing at run time (nothing calls dlclose), so the range still holds that
        // mapping. An error (a locked mapping) only leaves it resident.
        let r = unsafe {
            nix::libc::madvise(
                m.start as *mut nix::libc::c_void,
                m.end - m.start,
                nix::libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            released.mappings += 1;
            released.bytes += m.rss_kib * 1024;
        }
    }
    trim_heap();
    Ok(released)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; any thread may call it.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5605f7bd7000-5605f7f5c000 r--p 00000000 fe:00 10010747                   /usr/bin/ambientd
Size:               3604 kB
Rss:                1864 kB
Anonymous:             0 kB
5605f7f5c000-5605f8d01000 r-xp 00384000 fe:00 10010747                   /usr/bin/ambientd
Size:              14004 kB
Rss:                9012 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
5605f8d01000-5605f8d6c000 r--p 01128000 fe:00 10010747                   /usr/bin/ambientd
Rss:                 428 kB
Anonymous:           428 kB
5605f8d6c000-5605f8d70000 rw-p 0116c000 fe:00 10010747                   /usr/bin/ambientd
Rss:                  16 kB
Anonymous:            16 kB
560621198000-560621239000 rw-p 00000000 00:00 0                          [heap]
Rss:                 516 kB
Anonymous:           516 kB
7fafb28ac000-7fafb2a02000 r-xp 00026000 fe:00 326279                     /opt/my libs/libc.so.6
Rss:                 912 kB
Anonymous:             0 kB
7fafb2b00000-7fafb2b01000 r--p 00000000 fe:00 1                          /never/touched
Rss:                   0 kB
Anonymous:             0 kB
7ffcdedfe000-7ffcdee00000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
7ffcdee00000-7ffcdee01000 r--p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn reads_every_mapping_with_its_path_and_sizes() {
        let all = mappings(SMAPS);
        assert_eq!(all.len(), 9);
        assert_eq!(
            all[1],
            Mapping {
                start: 0x5605f7f5c000,
                end: 0x5605f8d01000,
                perms: "r-xp",
                path: "/usr/bin/ambientd",
                rss_kib: 9012,
                anonymous_kib: 0,
            }
        );
        assert_eq!(all[4].path, "[heap]");
        assert_eq!(all[5].path, "/opt/my libs/libc.so.6");
        assert_eq!(all[8].path, "");
        assert_eq!(all[8].rss_kib, 4);
    }

    #[test]
    fn only_unwritten_read_only_file_pages_are_released() {
        let picked: Vec<(usize, &str)> = mappings(SMAPS)
            .iter()
            .filter(|m| m.releasable())
            .map(|m| (m.start, m.perms))
            .collect();
        // Not: RELRO (written, then made read-only), writable data, the heap, an untouched
        // mapping, the vDSO, an anonymous mapping.
        assert_eq!(
            picked,
            [
                (0x5605f7bd7000, "r--p"),
                (0x5605f7f5c000, "r-xp"),
                (0x7fafb28ac000, "r-xp")
            ]
        );
    }

    #[test]
    fn a_mapping_without_its_anonymous_line_is_kept() {
        let all = mappings("7f00-7f01 r--p 00000000 fe:00 1 /lib/x.so\nRss: 4 kB\n");
        assert_eq!(all.len(), 1);
        assert!(!all[0].releasable());
    }

    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_ascii_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn releasing_shrinks_the_resident_file_pages_and_the_code_still_runs() {
        // A read-only constant (the binary's .rodata), summed through a black box so the
        // compiler cannot fold it.
        let sum = || {
            std::hint::black_box(SMAPS)
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        };
        let data = sum();
        let before = rss_file_kib();
        let released = release_startup_pages().unwrap();
        let after = rss_file_kib();
        assert!(released.mappings > 0 && released.bytes > 0, "{released:?}");
        assert!(
            after < before,
            "RssFile {before} kB before, {after} kB after"
        );
        // Code and read-only data come back, the same, on their next use.
        assert_eq!(sum(), data);
        assert_eq!(mappings(SMAPS).len(), 9);
    }
}
