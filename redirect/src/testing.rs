//! Scratch network namespaces for tests (feature `testing`; needs root and iproute2).
//!
//! Names carry the prefix `amb-<pid>-<n>-` so concurrent test processes never collide and a
//! later run can tell which leftovers belong to a dead process. The guard deletes its namespace
//! when dropped, also while a failing test unwinds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::command::{self, CommandError};
use crate::netns::{Netns, NetnsError};

/// Prefix of every namespace this project's tests create.
pub const PREFIX: &str = "amb-";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`/var/run/netns/<name>`) with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct ScratchNetns {
    name: String,
}

impl ScratchNetns {
    /// Creates `amb-<pid>-<n>-<tag>`; keep `tag` short.
    pub fn create(tag: &str) -> Result<ScratchNetns, CommandError> {
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = ScratchNetns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    pub fn open(&self) -> Result<Netns, NetnsError> {
        Netns::open(self.path())
    }

    /// Runs `ip -n <name> args…` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "could not delete test network namespace {}: {err}",
                self.name
            );
        }
    }
}

fn ip(args: &[&str]) -> Result<String, CommandError> {
    command::run(Path::new("ip"), args, None)
}

/// Deletes namespaces with our prefix whose creating process is gone.
pub fn sweep_stale() -> Result<(), CommandError> {
    for line in ip(&["netns", "list"])?.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            ip(&["netns", "del", name])?;
        }
    }
    Ok(())
}

/// True when the test can run as root. Otherwise: with `CI` set this panics (root-only tests
/// must not pass by skipping in CI); without it, it prints that `test` is skipped.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root (network namespaces, netfilter) and CI is set: refusing to skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}
