//! The local mesh file while the agent runs: polled for changes, validated again, and swapped
//! into the store whole, so policies (and workloads and services) edited in the file take
//! effect on a running agent, and the re-check closes open connections they now deny.
//!
//! Polling, not SIGHUP: it needs no signal plumbing, works for editors that replace the file
//! and for Kubernetes ConfigMap symlink swaps, and lets several agents in one process (tests)
//! each watch their own file. Each tick compares the file's metadata (mtime, size, inode);
//! because Linux stamps mtimes at timer-tick granularity, a file modified within the last
//! [`RECENT`] is also read and compared byte for byte, so two quick writes are not missed. An
//! edit is taken once two reads in a row agree ([`xds::local::Settle`]): a read between a
//! writer's truncate and its write finds an empty or cut-off file, which may parse, and would
//! otherwise drop workloads or policies for one interval.
//!
//! A file that fails to load is refused whole with its error logged; the last good state
//! stays in force, so a broken edit never loosens what is enforced. Enrollment follows the
//! store's change notice, so workloads that join or leave this node are (un-)enrolled.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// Files modified this recently are compared by content even when their metadata matches.
const RECENT: Duration = Duration::from_secs(2);

/// Reload outcomes so far, for logs, tests and the admin side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Changed files loaded and swapped in.
    pub applied: u64,
    /// Changed files refused.
    pub rejected: u64,
    /// Why the last refused file was refused (cleared by the next good one).
    pub last_error: Option<String>,
}

/// What the file looked like when last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: (u64, u64),
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    fn is_recent(&self) -> bool {
        self.modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RECENT)
    }
}

/// Watches one mesh file. Create it before the file's first load, so an edit racing the
/// start is seen as a change.
pub struct Watcher {
    path: PathBuf,
    stamp: Option<Stamp>,
    content: xds::local::Settle,
    status: watch::Sender<Status>,
}

impl Watcher {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            stamp: Stamp::of(path).ok(),
            content: xds::local::Settle::new(std::fs::read(path).ok()),
            status: watch::Sender::new(Status::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Checks the file once; when its content changed and reads the same as on the previous
    /// check, loads it and swaps it into `store`. Returns whether it took a change.
    pub fn poll(&mut self, store: &xds::Store) -> bool {
        let stamp = Stamp::of(&self.path).ok();
        let maybe_changed = self.content.pending()
            || stamp != self.stamp
            || stamp.as_ref().is_none_or(Stamp::is_recent);
        self.stamp = stamp;
        if !maybe_changed {
            return false;
        }
        let read = std::fs::read(&self.path);
        let (content, error) = match read {
            Ok(bytes) => (Some(bytes), None),
            Err(e) => (None, Some(e)),
        };
        if !self.content.offer(content) {
            return false;
        }
        let loaded = match (self.content.taken(), error) {
            (Some(bytes), _) => xds::local::parse_file(&self.path, bytes),
            (None, error) => Err(xds::local::LoadError::Read {
                path: self.path.clone(),
                source: error.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
            }),
        };
        match loaded {
            Ok(mesh) => {
                let (workloads, policies) = (mesh.workloads.len(), mesh.policies.len());
                drop(store.replace(mesh.into_state()));
                tracing::info!(path = %self.path.display(), workloads, policies, "mesh file reloaded");
                self.status.send_modify(|s| {
                    s.applied += 1;
                    s.last_error = None;
                });
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "mesh file refused; the last good one stays in force"
                );
                self.status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_error = Some(e.to_string());
                });
            }
        }
        true
    }

    /// Polls every `interval` until dropped.
    pub async fn run(mut self, store: xds::Store, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.poll(&store);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "workloads:\n  - {name: a, namespace: demo, node: n, addresses: [198.18.0.2]}\n";

    fn deny_all(name: &str) -> String {
        format!(
            "{GOOD}policies:\n  - {{name: {name}, namespace: demo, scope: NAMESPACE, action: DENY, rules: [{{}}]}}\n"
        )
    }

    /// Polls until the watcher takes the file as it is now: the first read only sees it.
    fn settled(watcher: &mut Watcher, store: &xds::Store) -> bool {
        let first = watcher.poll(store);
        assert!(!first, "an edit is taken only when a second read agrees");
        watcher.poll(store)
    }

    #[test]
    fn changes_are_applied_and_bad_files_leave_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let mut watcher = Watcher::new(&path);
        let store = xds::Store::new(xds::local::load(&path).unwrap().into_state());
        let status = watcher.status();
        assert!(!watcher.poll(&store), "same content is no change");

        // Same length, written right after: only the content tells them apart.
        std::fs::write(&path, deny_all("p1")).unwrap();
        assert!(settled(&mut watcher, &store));
        std::fs::write(&path, deny_all("p2")).unwrap();
        assert!(settled(&mut watcher, &store));
        assert!(store.read(|s| s.policies().get("demo/p2").is_some()));
        assert_eq!(status.borrow().applied, 2);

        // A broken policy: refused, and the deny stays.
        std::fs::write(&path, deny_all("p2").replace("DENY", "DENIED")).unwrap();
        assert!(settled(&mut watcher, &store));
        let now = status.borrow().clone();
        assert_eq!(now.rejected, 1);
        let error = now.last_error.unwrap();
        assert!(error.contains("mesh.yaml:4:"), "{error}");
        assert!(error.contains("policies[0].action"), "{error}");
        assert!(error.contains("unknown variant `DENIED`"), "{error}");
        assert!(store.read(|s| s.policies().get("demo/p2").is_some()));
        // Not reported again until it changes.
        assert!(!watcher.poll(&store));

        // A file that vanishes is refused too; the state stays.
        std::fs::remove_file(&path).unwrap();
        assert!(settled(&mut watcher, &store));
        assert_eq!(status.borrow().rejected, 2);
        assert!(store.read(|s| s.policies().get("demo/p2").is_some()));
        std::fs::write(&path, GOOD).unwrap();
        assert!(settled(&mut watcher, &store));
        assert!(store.read(|s| s.policies().is_empty()));
        assert_eq!(status.borrow().last_error, None);
    }

    #[test]
    fn a_read_between_truncate_and_write_is_never_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, deny_all("p")).unwrap();
        let mut watcher = Watcher::new(&path);
        let store = xds::Store::new(xds::local::load(&path).unwrap().into_state());
        let status = watcher.status();
        let in_force =
            || store.read(|s| s.workloads().count() == 1 && s.policies().get("demo/p").is_some());

        // Truncated (an empty mesh) and cut off inside the policy list (valid YAML, no policy):
        // each read once, then the writer finishes with the same content.
        for torn in ["", GOOD] {
            std::fs::write(&path, torn).unwrap();
            assert!(!watcher.poll(&store));
            std::fs::write(&path, deny_all("p")).unwrap();
            assert!(!watcher.poll(&store));
            assert!(!watcher.poll(&store));
            assert!(in_force(), "torn read {torn:?} was applied");
        }
        // A writer that finishes with new content: taken once it reads the same twice.
        std::fs::write(&path, "").unwrap();
        assert!(!watcher.poll(&store));
        std::fs::write(&path, deny_all("q")).unwrap();
        assert!(settled(&mut watcher, &store));
        assert!(store.read(|s| s.policies().get("demo/q").is_some()));
        // An empty file that stays empty is an edit like any other.
        std::fs::write(&path, "").unwrap();
        assert!(settled(&mut watcher, &store));
        assert!(store.read(|s| s.policies().is_empty() && s.workloads().count() == 0));
        assert_eq!(
            *status.borrow(),
            Status {
                applied: 2,
                rejected: 0,
                last_error: None
            }
        );
    }
}
