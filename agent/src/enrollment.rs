//! Which pods of this node are enrolled in the mesh, as a source of changes the agent acts on.
//!
//! A [`Source`] reports the pods enrolled at start, then each enrollment and un-enrollment.
//! The agent turns them into capture rules and listeners (`app::pods`); the source only
//! decides *which* pods. [`mesh::MeshSource`] is the static source of local mode (the mesh
//! file's workloads on this node, with their `netns`); [`kube::KubeSource`] watches
//! namespaces and this node's pods on the Kubernetes API. The agent tells the source what
//! became of each change ([`Source::report`]), so a source can record it (the Kubernetes one
//! annotates the pod) and retry failures.

pub mod kube;
pub mod mesh;
pub mod procfs;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// An enrolled pod: the mesh workload it is, and its network namespace. Without a namespace
/// the agent serves the workload on its own addresses in the agent's namespace (loopback
/// mode, no capture rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The workload's uid in the mesh state.
    pub uid: String,
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Enrolled(Pod),
    Unenrolled {
        uid: String,
    },
    /// Remove every capture rule of ours from `netns`, which no enrolled pod owns: a pod that
    /// left the mesh while no agent served it. `pod` names it in logs.
    Cleanup {
        pod: String,
        netns: PathBuf,
    },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a source could not say which pods are enrolled.
#[derive(Debug, thiserror::Error)]
#[error("enrollment source {source_name}: {message}")]
pub struct SourceError {
    pub source_name: &'static str,
    pub message: String,
}

/// Where enrollment comes from.
pub trait Source: Send + 'static {
    /// The pods enrolled now; called once, before [`Source::next`].
    fn initial(&mut self) -> BoxFuture<'_, Result<Vec<Pod>, SourceError>>;

    /// The next change after those already reported; `None` when the source has ended.
    fn next(&mut self) -> BoxFuture<'_, Option<Change>>;

    /// What became of the last change [`Source::next`] returned, before `next` is called
    /// again. Sources that only list pods ignore it.
    fn report(&mut self, _outcome: Result<(), String>) {}
}
