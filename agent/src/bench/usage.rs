//! What a process uses, from `/proc`: CPU time (user and system, including exited threads),
//! resident memory, open file descriptors. The agents are separate processes, so their
//! figures hold nothing of the load generator.

use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// `VmRSS`, bytes.
    pub rss: u64,
    /// `RssAnon`, bytes: the heap and stacks, without the mapped binary.
    pub rss_anon: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// CPU seconds a process used so far: in its own code, and in the kernel on its behalf
/// (system calls, and the network stack's work the kernel did while it ran).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    pub user_s: f64,
    pub system_s: f64,
}

impl Cpu {
    pub fn total(self) -> f64 {
        self.user_s + self.system_s
    }
}

/// Which process: `self` or a PID.
#[derive(Debug, Clone, Copy)]
pub enum Process {
    Current,
    Pid(u32),
}

impl Process {
    fn dir(self) -> PathBuf {
        match self {
            Process::Current => PathBuf::from("/proc/self"),
            Process::Pid(pid) => PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// CPU seconds (user + system) so far.
    pub fn cpu_s(self) -> io::Result<f64> {
        Ok(self.cpu()?.total())
    }

    /// User and system CPU seconds so far.
    pub fn cpu(self) -> io::Result<Cpu> {
        let stat = std::fs::read_to_string(self.dir().join("stat"))?;
        cpu_from_stat(&stat, clock_ticks())
    }

    /// CPU, memory and descriptors now.
    pub fn usage(self) -> io::Result<Usage> {
        let status = std::fs::read_to_string(self.dir().join("status"))?;
        let fds = std::fs::read_dir(self.dir().join("fd"))?.count() as u64;
        Ok(Usage {
            cpu_s: self.cpu_s()?,
            rss: status_kib(&status, "VmRSS")? * 1024,
            rss_anon: status_kib(&status, "RssAnon")? * 1024,
            fds,
        })
    }
}

impl Process {
    /// The soft limit on open files (`Max open files` in `/proc/PID/limits`).
    pub fn open_files_limit(self) -> io::Result<u64> {
        let limits = std::fs::read_to_string(self.dir().join("limits"))?;
        soft_nofile(&limits)
    }
}

fn soft_nofile(limits: &str) -> io::Result<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| malformed("/proc limits (Max open files)"))
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed {what}"))
}

/// utime and stime (fields 14 and 15) of a `/proc/PID/stat` line, in seconds. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_from_stat(stat: &str, ticks_per_s: f64) -> io::Result<Cpu> {
    let rest = &stat[stat.rfind(')').ok_or_else(|| malformed("/proc stat"))? + 1..];
    // After the name: state is field 3, so utime (14) is the 12th token here.
    let mut fields = rest.split_whitespace().skip(11);
    let mut next = || -> io::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| malformed("/proc stat"))
    };
    let (utime, stime) = (next()?, next()?);
    Ok(Cpu {
        user_s: utime as f64 / ticks_per_s,
        system_s: stime as f64 / ticks_per_s,
    })
}

/// A `Key:   123 kB` line of `/proc/PID/status`, in KiB.
fn status_kib(status: &str, key: &str) -> io::Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| malformed(&format!("/proc status ({key})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let stat =
            "4242 (amb (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        let cpu = cpu_from_stat(stat, 100.0).unwrap();
        assert_eq!((cpu.user_s, cpu.system_s, cpu.total()), (2.5, 0.5, 3.0));
        assert!(cpu_from_stat("4242 no name", 100.0).is_err());
        assert!(cpu_from_stat("1 (x) S 1 2", 100.0).is_err());
    }

    #[test]
    fn status_values_are_read_in_kib() {
        let status = "Name:\tambientd\nVmRSS:\t    9876 kB\nRssAnon:\t  4321 kB\n";
        assert_eq!(status_kib(status, "VmRSS").unwrap(), 9876);
        assert_eq!(status_kib(status, "RssAnon").unwrap(), 4321);
        assert!(status_kib(status, "VmSwap").is_err());
    }

    #[test]
    fn open_files_limit_is_the_soft_one() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             95000                95000                processes\n\
                      Max open files            20000                40000                files\n";
        assert_eq!(soft_nofile(limits).unwrap(), 20000);
        assert!(soft_nofile("Max processes 1 1").is_err());
        assert!(Process::Current.open_files_limit().unwrap() > 0);
    }

    #[test]
    fn own_usage_is_plausible() {
        let u = Process::Current.usage().unwrap();
        assert!(u.rss > 0 && u.rss_anon > 0 && u.rss_anon <= u.rss, "{u:?}");
        assert!(u.fds >= 3, "{u:?}");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(60) {
            std::hint::black_box(0u64);
        }
        assert!(Process::Current.cpu_s().unwrap() > 0.0);
    }
}
