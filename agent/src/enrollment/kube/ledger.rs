//! The decisions of the Kubernetes enrollment, without I/O: what the API says (namespaces and
//! this node's pods), what the agent has applied, and the one next change that brings the two
//! together. Un-enrollments first, then clean-ups, then enrollments.
//!
//! A pod is wanted when it runs (phase `Running`, an IP), is not on the host network, and
//! its namespace or itself carries `istio.io/dataplane-mode=ambient` — unless it carries
//! `istio.io/dataplane-mode=none`. A wanted pod is enrolled as its mesh workload; one whose
//! workload is not (yet) in the mesh state waits (logged once) and is looked at again on the
//! next change of the state. A failed enrollment is retried with backoff, at most
//! [`MAX_ATTEMPTS`] times until the pod or its namespace changes. A pod that carries the
//! redirection annotation but is not wanted (un-labelled while no agent ran) has its rules
//! cleaned up.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use xds::Workload;

use crate::enrollment::{Change, Pod};

/// The label that puts a namespace or a pod in the mesh (`ambient`) or a pod out (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Set on a pod while its traffic is captured (Istio's name and value).
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";

/// Attempts at enrolling a pod before waiting for it or its namespace to change.
pub const MAX_ATTEMPTS: u32 = 5;

/// Whether a namespace puts its pods in the mesh.
pub fn namespace_is_ambient(ns: &Namespace) -> bool {
    ns.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE))
        .is_some_and(|m| m == "ambient")
}

/// What enrollment looks at in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Its `istio.io/dataplane-mode` label.
    pub mode: Option<String>,
    pub host_network: bool,
    /// Phase `Running` with an IP.
    pub running: bool,
    pub ips: Vec<IpAddr>,
}

impl PodView {
    /// The view of `pod` and whether it carries the redirection annotation; `None` for a pod
    /// without uid, name or namespace.
    pub fn of(pod: &KubePod) -> Option<(PodView, bool)> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref())
            && let Ok(ip) = ip.parse()
        {
            ips.push(ip);
        }
        let phase_running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let annotated = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(REDIRECTION))
            .is_some_and(|v| v == REDIRECTION_ENABLED);
        let view = PodView {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            mode: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(DATAPLANE_MODE))
                .cloned(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            running: phase_running && !ips.is_empty(),
            ips,
        };
        Some((view, annotated))
    }

    /// `namespace/name`, for logs.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the pod belongs in the mesh, given whether its namespace is ambient.
    pub fn wanted(&self, namespace_ambient: bool) -> bool {
        let opted_in = match self.mode.as_deref() {
            Some("none") => return false,
            Some("ambient") => true,
            _ => namespace_ambient,
        };
        opted_in && self.running && !self.host_network
    }
}

/// The mesh workload of a pod: Istio's uid for it (`<cluster>//Pod/<ns>/<name>`), else the
/// mesh file's default uid (`<ns>/<name>`), else the workload on this node with the pod's
/// name and namespace, else the one on this node with the pod's IP.
pub fn workload_for(
    state: &xds::State,
    cluster_id: &str,
    node: &str,
    pod: &PodView,
) -> Option<Arc<Workload>> {
    let (ns, name) = (&pod.namespace, &pod.name);
    state
        .workload_by_uid(&format!("{cluster_id}//Pod/{ns}/{name}"))
        .or_else(|| state.workload_by_uid(&format!("{ns}/{name}")))
        .or_else(|| {
            state
                .workloads_on_node(node)
                .into_iter()
                .find(|w| &w.name == name && w.identity().namespace() == ns)
        })
        .or_else(|| {
            pod.ips
                .iter()
                .filter_map(|ip| state.workload_by_ip("", *ip))
                .find(|w| w.node == node)
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    workload: String,
    netns: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    /// `None`: given up until the pod or its namespace changes.
    not_before: Option<Instant>,
}

/// The change the agent is acting on, to match its report.
#[derive(Debug, Clone)]
enum InFlight {
    Enroll { pod: String, applied: Applied },
    Unenroll { pod: String },
    Cleanup { pod: String },
}

/// Backoff before attempt `attempts + 1`: 1 s doubling, at most 30 s.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// What the API says and what the agent did, keyed by pod UID.
#[derive(Debug, Default)]
pub struct Ledger {
    cluster_id: String,
    node: String,
    namespaces: BTreeMap<String, bool>,
    pods: BTreeMap<String, (PodView, bool)>,
    applied: BTreeMap<String, Applied>,
    retries: BTreeMap<String, Retry>,
    /// Not wanted, and nothing of ours is left in its namespace.
    cleaned: BTreeSet<String>,
    /// Wanted, waiting for its workload (logged once).
    waiting: BTreeSet<String>,
    in_flight: Option<InFlight>,
}

impl Ledger {
    pub fn new(cluster_id: &str, node: &str) -> Self {
        Ledger {
            cluster_id: cluster_id.to_owned(),
            node: node.to_owned(),
            ..Ledger::default()
        }
    }

    pub fn set_namespace(&mut self, name: &str, ambient: bool) {
        if self.namespaces.insert(name.to_owned(), ambient) != Some(ambient) {
            self.forget_failures(|p| p.namespace == name);
        }
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    /// A fresh list of every namespace.
    pub fn replace_namespaces(&mut self, all: BTreeMap<String, bool>) {
        let changed: Vec<String> = all
            .iter()
            .filter(|(n, a)| self.namespaces.get(*n) != Some(a))
            .map(|(n, _)| n.clone())
            .collect();
        self.namespaces = all;
        self.forget_failures(|p| changed.contains(&p.namespace));
    }

    pub fn set_pod(&mut self, view: PodView, annotated: bool) {
        let uid = view.uid.clone();
        let changed = self.pods.get(&uid).is_none_or(|(old, _)| *old != view);
        self.pods.insert(uid.clone(), (view, annotated));
        if changed {
            self.retries.remove(&uid);
        }
    }

    /// Records the redirection annotation as patched, ahead of the watch.
    pub fn set_annotated(&mut self, uid: &str, annotated: bool) {
        if let Some((_, a)) = self.pods.get_mut(uid) {
            *a = annotated;
        }
    }

    pub fn remove_pod(&mut self, uid: &str) {
        self.pods.remove(uid);
    }

    /// A fresh list of every pod of this node.
    pub fn replace_pods(&mut self, all: Vec<(PodView, bool)>) {
        let old = std::mem::take(&mut self.pods);
        for (view, annotated) in all {
            if old.get(&view.uid).is_some_and(|(o, _)| *o == view) {
                self.pods.insert(view.uid.clone(), (view, annotated));
            } else {
                self.set_pod(view, annotated);
            }
        }
    }

    fn forget_failures(&mut self, of: impl Fn(&PodView) -> bool) {
        let pods = &self.pods;
        self.retries
            .retain(|uid, _| !pods.get(uid).is_some_and(|(p, _)| of(p)));
    }

    fn wanted(&self, pod: &PodView) -> bool {
        pod.wanted(
            self.namespaces
                .get(&pod.namespace)
                .copied()
                .unwrap_or(false),
        )
    }

    /// The next change to make, or `None` when the agent is where the API wants it (for
    /// now). `netns` finds a pod's network namespace by pod UID.
    pub fn step(
        &mut self,
        state: &xds::State,
        netns: &dyn Fn(&str) -> io::Result<Option<PathBuf>>,
        now: Instant,
    ) -> Option<Change> {
        debug_assert!(self.in_flight.is_none(), "a change is awaiting its report");
        self.collect_garbage();
        // Un-enroll what is no longer wanted, deleted, or now another workload.
        for (uid, applied) in &self.applied {
            let keep = self.pods.get(uid).is_some_and(|(p, _)| {
                self.wanted(p)
                    && workload_for(state, &self.cluster_id, &self.node, p)
                        .is_some_and(|w| w.uid == applied.workload)
            });
            if !keep {
                let change = Change::Unenrolled {
                    uid: applied.workload.clone(),
                };
                self.in_flight = Some(InFlight::Unenroll { pod: uid.clone() });
                return Some(change);
            }
        }
        // Clean up after pods that left the mesh while no agent ran.
        let stale: Vec<PodView> = self
            .pods
            .values()
            .filter(|(p, annotated)| {
                *annotated
                    && !self.wanted(p)
                    && !self.applied.contains_key(&p.uid)
                    && !self.cleaned.contains(&p.uid)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for pod in stale {
            match netns(&pod.uid) {
                Ok(Some(path)) => {
                    self.in_flight = Some(InFlight::Cleanup {
                        pod: pod.uid.clone(),
                    });
                    return Some(Change::Cleanup {
                        pod: pod.label(),
                        netns: path,
                    });
                }
                // Its namespace is gone, and our rules with it.
                Ok(None) => {
                    self.cleaned.insert(pod.uid);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.label(), error = %e, "cannot look for the pod's network namespace to clean up");
                    self.cleaned.insert(pod.uid);
                }
            }
        }
        // Enroll what is wanted.
        let candidates: Vec<PodView> = self
            .pods
            .values()
            .map(|(p, _)| p)
            .filter(|p| self.wanted(p) && !self.applied.contains_key(&p.uid))
            .filter(|p| {
                self.retries
                    .get(&p.uid)
                    .is_none_or(|r| r.not_before.is_some_and(|t| t <= now))
            })
            .cloned()
            .collect();
        for pod in candidates {
            let Some(workload) = workload_for(state, &self.cluster_id, &self.node, &pod) else {
                // Waiting is no attempt: the state's next change brings it back here.
                self.retries.remove(&pod.uid);
                if self.waiting.insert(pod.uid.clone()) {
                    tracing::info!(pod = %pod.label(), ips = ?pod.ips, "pod waits for its workload in the mesh state");
                }
                continue;
            };
            self.waiting.remove(&pod.uid);
            if let Some((other, _)) = self
                .applied
                .iter()
                .find(|(_, a)| a.workload == workload.uid)
            {
                let other = self.pods.get(other).map(|(p, _)| p.label());
                self.failed(
                    &pod,
                    format!(
                        "workload {} is already enrolled for pod {other:?}",
                        workload.uid
                    ),
                    now,
                );
                continue;
            }
            match netns(&pod.uid) {
                Ok(Some(path)) => {
                    self.in_flight = Some(InFlight::Enroll {
                        pod: pod.uid.clone(),
                        applied: Applied {
                            workload: workload.uid.clone(),
                            netns: path.clone(),
                        },
                    });
                    return Some(Change::Enrolled(Pod {
                        uid: workload.uid.clone(),
                        netns: Some(path),
                    }));
                }
                Ok(None) => self.failed(
                    &pod,
                    "no process of the pod found in the host's /proc".into(),
                    now,
                ),
                Err(e) => self.failed(&pod, format!("reading the host's /proc: {e}"), now),
            }
        }
        None
    }

    /// What became of the change [`Ledger::step`] returned last.
    pub fn report(&mut self, outcome: Result<(), String>, now: Instant) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        match (in_flight, outcome) {
            (InFlight::Enroll { pod, applied }, Ok(())) => {
                self.retries.remove(&pod);
                self.cleaned.remove(&pod);
                self.applied.insert(pod, applied);
            }
            (InFlight::Enroll { pod, .. }, Err(e)) => {
                if let Some((view, _)) = self.pods.get(&pod) {
                    let view = view.clone();
                    self.failed(&view, e, now);
                }
            }
            (InFlight::Unenroll { pod }, outcome) => {
                // Whatever removing the rules did, the agent no longer serves the pod.
                self.applied.remove(&pod);
                if outcome.is_ok() {
                    self.cleaned.insert(pod);
                }
            }
            (InFlight::Cleanup { pod }, Ok(())) => {
                self.cleaned.insert(pod);
            }
            (InFlight::Cleanup { pod }, Err(e)) => {
                // Not retried: the rules fail closed, and the next agent start tries again.
                let label = self.pods.get(&pod).map(|(p, _)| p.label());
                tracing::error!(pod = ?label, error = %e, "cleaning up the capture rules of a pod that left the mesh failed");
                self.cleaned.insert(pod);
            }
        }
    }

    fn failed(&mut self, pod: &PodView, error: String, now: Instant) {
        let retry = self.retries.entry(pod.uid.clone()).or_insert(Retry {
            attempts: 0,
            not_before: None,
        });
        retry.attempts += 1;
        if retry.attempts >= MAX_ATTEMPTS {
            retry.not_before = None;
            tracing::error!(pod = %pod.label(), attempts = retry.attempts, %error, "enrollment failed; giving up until the pod or its namespace changes");
        } else {
            let wait = backoff(retry.attempts);
            retry.not_before = Some(now + wait);
            tracing::warn!(pod = %pod.label(), attempt = retry.attempts, retry_in = ?wait, %error, "enrollment failed; retrying");
        }
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.values().filter_map(|r| r.not_before).min()
    }

    /// Pods whose redirection annotation is not what it should be, with what it should be:
    /// set while enrolled, removed once nothing of ours is left; pods in between keep theirs.
    pub fn annotations_to_fix(&self) -> Vec<(PodView, bool)> {
        self.pods
            .values()
            .filter_map(|(p, annotated)| {
                let want = if self.applied.contains_key(&p.uid) {
                    true
                } else if self.cleaned.contains(&p.uid) && !self.wanted(p) {
                    false
                } else {
                    return None;
                };
                (want != *annotated).then(|| (p.clone(), want))
            })
            .collect()
    }

    /// Pods that are wanted and not enrolled: waiting for their workload, or failing.
    pub fn pending(&self) -> usize {
        self.pods
            .values()
            .filter(|(p, _)| self.wanted(p) && !self.applied.contains_key(&p.uid))
            .count()
    }

    /// Bookkeeping of pods the API no longer lists; applied ones stay until un-enrolled.
    fn collect_garbage(&mut self) {
        let pods = &self.pods;
        self.retries.retain(|uid, _| pods.contains_key(uid));
        self.cleaned.retain(|uid| pods.contains_key(uid));
        self.waiting.retain(|uid| pods.contains_key(uid));
    }
}

#[cfg(test)]
mod tests;
