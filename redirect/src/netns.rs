//! A handle on a network namespace given by path (`/var/run/netns/NAME`, `/proc/PID/ns/net`)
//! and a way to run code inside it.
//!
//! `setns` switches only the calling thread, so [`Netns::run`] does the work on a dedicated
//! thread that enters the namespace, runs the closure and switches back; the caller's threads
//! never change namespace. Processes spawned and sockets created on that thread live in the
//! target namespace. Creating and deleting namespaces is not this module's business (see the
//! `testing` feature for scratch namespaces).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot open the current thread's network namespace: {source}")]
    OpenCurrent { source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot start a thread to enter network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

const CURRENT: &str = "/proc/thread-self/ns/net";

impl Netns {
    /// Opens the namespace at `path`. Whether it is a network namespace shows on first use.
    pub fn open(path: impl Into<PathBuf>) -> Result<Netns, NetnsError> {
        let path = path.into();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Netns { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread inside this namespace and returns its result. A panic in `f`
    /// is resumed on the caller's thread.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("netns".to_owned())
                .spawn_scoped(scope, || self.enter_and_run(f))
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    fn enter_and_run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let original = File::open(CURRENT).map_err(|source| NetnsError::OpenCurrent { source })?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        // The thread ends right after, so a failed switch back cannot leak the namespace to
        // other work; it is still worth knowing about.
        if let Err(err) = setns(&original, CloneFlags::CLONE_NEWNET) {
            tracing::warn!(
                netns = %self.path.display(),
                %err,
                "could not switch thread back to its network namespace"
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_names_the_missing_path() {
        let err = Netns::open("/nonexistent/netns/amb-test").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot open network namespace /nonexistent/netns/amb-test: "),
            "{err}"
        );
    }

    #[test]
    fn entering_a_file_that_is_no_namespace_fails() {
        let file = std::env::current_exe().unwrap();
        let ns = Netns::open(&file).unwrap();
        let err = ns.run(|| ()).unwrap_err();
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
    }

    #[test]
    fn runs_in_own_namespace_and_leaves_caller_alone() {
        // Entering our own namespace needs CAP_SYS_ADMIN; without it the error is the answer.
        let ns = Netns::open(CURRENT).unwrap();
        let before = std::fs::read_link(CURRENT).unwrap();
        match ns.run(|| std::fs::read_link(CURRENT).unwrap()) {
            Ok(inside) => assert_eq!(inside, before),
            Err(err) => assert!(matches!(err, NetnsError::Enter { .. }), "{err}"),
        }
        assert_eq!(std::fs::read_link(CURRENT).unwrap(), before);
    }
}
