//! The enrolled pods of this node, and what enrolling one means.
//!
//! Enrolling a pod with a network namespace: apply its capture rules inside the namespace,
//! then open its outbound, inbound-plaintext and HBONE listeners there (wildcard addresses of
//! the pod's IP families, marked, SO_REUSEPORT, transparent in tproxy mode); every connection
//! they serve opens its sockets in that namespace too. Between the two steps captured
//! connections are refused, never let through. A pod without a namespace is served on its
//! own addresses in the agent's namespace (loopback mode), with no rules.
//!
//! Un-enrolling removes the pod's rules (new connections go direct), then stops its listeners,
//! releases its pooled HBONE connections and lets its open connections finish until the drain
//! deadline. Stopping the agent drains
//! every pod but leaves the rules in place: while no agent serves a pod, its captured traffic
//! fails instead of bypassing the mesh; a restarted agent re-applies them idempotently.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use identity::Identity;
use redirect::{InboundMode, RuleSet};
use tokio::task::JoinSet;
use xds::Workload;

use super::{Listener, Role};
use crate::capture::CaptureSettings;
use crate::drain;
use crate::enrollment::{Change, Pod};
use crate::netns::{Home, Net, NetnsError, PodNet};
use crate::proxy::{self, Proxy, inbound, outbound, plaintext};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {uid} is not a workload in the mesh state")]
    NotInMesh { uid: String },
    #[error("pod {uid}: no certificate for {identity}: {source}")]
    Certificate {
        uid: String,
        identity: Identity,
        source: Box<ca_client::Error>,
    },
    #[error("pod {uid}: no capture rules for its addresses: {source}")]
    Plan {
        uid: String,
        source: redirect::ConfigError,
    },
    #[error("pod {uid}: {source}")]
    Netns { uid: String, source: NetnsError },
    #[error("pod {uid}: capture rules: {source}")]
    Rules {
        uid: String,
        source: redirect::InstallError,
    },
    #[error("pod {uid}: binding {role:?} listener {addr}{where_}: {source}")]
    Bind {
        uid: String,
        role: Role,
        addr: SocketAddr,
        where_: String,
        source: io::Error,
    },
}

/// Capture rules installed in one pod's namespace.
#[derive(Clone)]
struct Installed {
    netns: Arc<redirect::Netns>,
    plan: Arc<RuleSet>,
}

/// The two steps of taking a pod's rules away.
#[derive(Clone, Copy, Debug)]
enum RuleStep {
    /// Capture removed, return path kept while connections drain.
    StopCapture,
    Remove,
}

struct Enrolled {
    /// The workload's addresses when enrolled: its pooled connections' source.
    addresses: Vec<IpAddr>,
    listeners: Vec<Listener>,
    rules: Option<Installed>,
    trigger: drain::Trigger,
    tasks: JoinSet<()>,
}

pub struct Pods {
    proxy: Arc<Proxy>,
    capture: CaptureSettings,
    home: Home,
    drain_deadline: Duration,
    enrolled: Mutex<HashMap<String, Enrolled>>,
}

impl Pods {
    pub fn new(
        proxy: Arc<Proxy>,
        capture: CaptureSettings,
        home: Home,
        drain_deadline: Duration,
    ) -> Self {
        Pods {
            proxy,
            capture,
            home,
            drain_deadline,
            enrolled: Mutex::new(HashMap::new()),
        }
    }

    fn enrolled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        self.enrolled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every listener of every enrolled pod.
    pub fn listeners(&self) -> Vec<Listener> {
        self.enrolled()
            .values()
            .flat_map(|e| e.listeners.iter().cloned())
            .collect()
    }

    /// Acts on one change of the enrollment source and says how it went; failures are also
    /// logged (the pod stays un-enrolled, its traffic uncaptured unless rules were left by an
    /// earlier agent).
    pub async fn apply(&self, change: Change) -> Result<(), EnrollError> {
        let result = match change {
            Change::Enrolled(pod) => {
                let uid = pod.uid.clone();
                let result = self.enroll(pod).await;
                if let Err(e) = &result {
                    tracing::error!(pod = %uid, error = %e, "enrollment failed");
                }
                result
            }
            Change::Unenrolled { uid } => self.leave(&uid).await.map(drop),
            Change::Cleanup { pod, netns } => self.cleanup(&pod, &netns).await,
        };
        self.refresh_wanted();
        result
    }

    /// Removes whatever capture rules of ours `netns` holds, for `pod` that is enrolled
    /// nowhere (it left the mesh while no agent served it).
    pub async fn cleanup(&self, pod: &str, netns: &std::path::Path) -> Result<(), EnrollError> {
        let plan = self
            .capture
            .plan_all_families(self.proxy.cfg.ports)
            .map_err(|source| EnrollError::Plan {
                uid: pod.to_owned(),
                source,
            })?;
        let installed = Installed {
            netns: Arc::new(
                redirect::Netns::open(netns).map_err(|e| EnrollError::Rules {
                    uid: pod.to_owned(),
                    source: e.into(),
                })?,
            ),
            plan: Arc::new(plan),
        };
        self.change_rules(pod, &installed, RuleStep::Remove).await?;
        tracing::info!(pod = %pod, netns = %netns.display(), "capture rules of a pod out of the mesh cleaned up");
        Ok(())
    }

    /// Tells the certificate cache which identities this node needs now: new ones are fetched
    /// ahead and kept fresh, the ones no enrolled pod uses any more are forgotten.
    pub(crate) fn refresh_wanted(&self) {
        let uids: Vec<String> = self.enrolled().keys().cloned().collect();
        let wanted: Vec<identity::Identity> = uids
            .iter()
            .filter_map(|uid| self.proxy.state.workload_by_uid(uid))
            .map(|w| w.identity().clone())
            .collect();
        self.proxy.certs.set_wanted(wanted);
    }

    /// Enrolls `pod` (re-enrolls it when it already is).
    pub async fn enroll(&self, pod: Pod) -> Result<(), EnrollError> {
        self.unenroll(&pod.uid).await;
        let uid = pod.uid.clone();
        let workload = self
            .proxy
            .state
            .workload_by_uid(&uid)
            .ok_or_else(|| EnrollError::NotInMesh { uid: uid.clone() })?;
        let identity = workload.identity().clone();
        self.proxy
            .certs
            .get(&identity)
            .await
            .map_err(|source| EnrollError::Certificate {
                uid: uid.clone(),
                identity,
                source: Box::new(source),
            })?;
        let (net, rules) = match &pod.netns {
            None => (Net::Host, None),
            Some(path) => {
                let (net, rules) = self.capture(&workload, path).await?;
                (net, Some(rules))
            }
        };
        match self.listen(&workload, &net) {
            Ok((listeners, tasks, trigger)) => {
                tracing::info!(
                    pod = %uid,
                    netns = %pod.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
                    listeners = listeners.len(),
                    "pod enrolled"
                );
                self.enrolled().insert(
                    uid,
                    Enrolled {
                        addresses: workload.addresses.clone(),
                        listeners,
                        rules,
                        trigger,
                        tasks,
                    },
                );
                Ok(())
            }
            Err(e) => {
                if let Some(rules) = rules {
                    let _ = self.change_rules(&uid, &rules, RuleStep::Remove).await;
                }
                Err(e)
            }
        }
    }

    /// Applies the pod's capture rules and opens its namespace.
    async fn capture(
        &self,
        workload: &Workload,
        path: &std::path::Path,
    ) -> Result<(Net, Installed), EnrollError> {
        let uid = &workload.uid;
        let plan = self
            .capture
            .plan(workload, self.proxy.cfg.ports)
            .map_err(|source| EnrollError::Plan {
                uid: uid.clone(),
                source,
            })?;
        let mark = plan.config().socket_mark;
        let installed = Installed {
            netns: Arc::new(redirect::Netns::open(path).map_err(|e| EnrollError::Rules {
                uid: uid.clone(),
                source: e.into(),
            })?),
            plan: Arc::new(plan),
        };
        let (netns, plan) = (installed.netns.clone(), installed.plan.clone());
        let (backend, tools) = (self.capture.backend, self.capture.tools.clone());
        tokio::task::spawn_blocking(move || redirect::apply(&netns, &plan, backend, &tools))
            .await
            .expect("applying capture rules does not panic")
            .map_err(|source| EnrollError::Rules {
                uid: uid.clone(),
                source,
            })?;
        let pod = PodNet::open(
            path,
            self.home.clone(),
            mark,
            self.capture.inbound == InboundMode::Tproxy,
        );
        match pod {
            Ok(pod) => Ok((Net::Pod(Arc::new(pod)), installed)),
            Err(source) => {
                let _ = self.change_rules(uid, &installed, RuleStep::Remove).await;
                Err(EnrollError::Netns {
                    uid: uid.clone(),
                    source,
                })
            }
        }
    }

    /// Opens the pod's listeners and starts serving them.
    fn listen(
        &self,
        workload: &Arc<Workload>,
        net: &Net,
    ) -> Result<(Vec<Listener>, JoinSet<()>, drain::Trigger), EnrollError> {
        let (trigger, watch) = drain::channel();
        let mut tasks = JoinSet::new();
        let mut listeners = Vec::new();
        let ports = self.proxy.cfg.ports;
        for ip in listen_ips(workload, net) {
            for (role, port) in [
                (Role::Hbone, ports.hbone),
                (Role::Outbound, ports.outbound),
                (Role::InboundPlaintext, ports.inbound_plaintext),
            ] {
                let addr = SocketAddr::new(ip, port);
                let listener = net.listen(addr).map_err(|source| EnrollError::Bind {
                    uid: workload.uid.clone(),
                    role,
                    addr,
                    where_: net
                        .path()
                        .map(|p| format!(" in {}", p.display()))
                        .unwrap_or_default(),
                    source,
                })?;
                let local = listener.local_addr().unwrap_or(addr);
                listeners.push(Listener {
                    role,
                    workload: Some(workload.uid.clone()),
                    addr: local,
                });
                tracing::info!(role = ?role, addr = %local, workload = %workload.uid, netns = ?net.path(), "listening");
                let (p, w, n, d) = (
                    self.proxy.clone(),
                    workload.clone(),
                    net.clone(),
                    watch.clone(),
                );
                match role {
                    Role::Hbone => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            inbound::handle(p.clone(), n.clone(), w.clone(), s, peer, d.clone())
                        }))
                    }
                    Role::Outbound => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            outbound::handle(p.clone(), n.clone(), w.clone(), s, peer)
                        }))
                    }
                    Role::InboundPlaintext => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            plaintext::handle(p.clone(), n.clone(), w.clone(), s, peer)
                        }))
                    }
                    Role::Socks5 | Role::Readiness => unreachable!("not a pod listener"),
                };
            }
        }
        Ok((listeners, tasks, trigger))
    }

    /// Un-enrolls `uid`: removes its rules, stops its listeners, drains its connections.
    /// Returns whether it was enrolled.
    pub async fn unenroll(&self, uid: &str) -> bool {
        self.leave(uid).await.unwrap_or(true)
    }

    /// [`Pods::unenroll`], failing when the rules could not be removed.
    async fn leave(&self, uid: &str) -> Result<bool, EnrollError> {
        let Some(mut pod) = self.enrolled().remove(uid) else {
            return Ok(false);
        };
        // Capture first: from then on the pod's new connections go direct, and its listeners
        // still serve those captured until then. Closing the listeners first refused every
        // connection captured in between (the rules take tens of milliseconds to change): 191
        // of 3,318 in `tests/tests/upgrade.rs`. The return path stays until the drain ends:
        // the app's replies to the connections the agent delivered from a client's address
        // need it (removing it with the capture broke 1-5 of ~12,000 in flight).
        let netns = pod.rules.as_ref().map(|r| r.netns.path().to_owned());
        let mut rules = pod.rules.take();
        let mut removed = Ok(());
        if let Some(installed) = &rules
            && let Err(error) = self
                .change_rules(uid, installed, RuleStep::StopCapture)
                .await
        {
            tracing::warn!(pod = %uid, %error, "removing all rules at once instead");
            removed = self.change_rules(uid, installed, RuleStep::Remove).await;
            rules = None;
        }
        let drain = tokio::spawn(pod.trigger.drain(self.drain_deadline));
        for ip in &pod.addresses {
            self.proxy.pool.forget_source(*ip);
        }
        let outcome = drain.await.unwrap_or(drain::Outcome::Forced);
        pod.tasks.shutdown().await;
        if let Some(rules) = &rules {
            removed = self.change_rules(uid, rules, RuleStep::Remove).await;
        }
        tracing::info!(pod = %uid, netns = ?netns, ?outcome, "pod unenrolled");
        removed.map(|()| true)
    }

    async fn change_rules(
        &self,
        uid: &str,
        rules: &Installed,
        step: RuleStep,
    ) -> Result<(), EnrollError> {
        let (backend, tools) = (self.capture.backend, self.capture.tools.clone());
        let Installed { netns, plan } = rules.clone();
        let changed = tokio::task::spawn_blocking(move || match step {
            RuleStep::StopCapture => redirect::stop_capture(&netns, &plan, backend, &tools),
            RuleStep::Remove => redirect::remove(&netns, &plan, backend, &tools),
        })
        .await
        .expect("changing capture rules does not panic");
        changed.map_err(|source| {
            tracing::error!(pod = %uid, error = %source, ?step, "capture rules could not be changed");
            EnrollError::Rules {
                uid: uid.to_owned(),
                source,
            }
        })
    }

    /// Un-enrolls every pod, rules included (the demo's and tests' clean-up).
    pub async fn unenroll_all(&self) {
        let uids: Vec<String> = self.enrolled().keys().cloned().collect();
        for uid in uids {
            self.unenroll(&uid).await;
        }
    }

    /// Agent shutdown: drains every pod's listeners and connections, leaving capture rules in
    /// place so captured traffic fails while no agent serves it.
    pub async fn shutdown(&self, deadline: Duration) -> drain::Outcome {
        let pods: Vec<(String, Enrolled)> = self.enrolled().drain().collect();
        let kept: Vec<PathBuf> = pods
            .iter()
            .filter_map(|(_, p)| p.rules.as_ref().map(|r| r.netns.path().to_owned()))
            .collect();
        let mut drains = JoinSet::new();
        for (_, pod) in pods {
            drains.spawn(async move {
                let mut tasks = pod.tasks;
                let outcome = pod.trigger.drain(deadline).await;
                tasks.shutdown().await;
                outcome
            });
        }
        let mut outcome = drain::Outcome::Clean;
        while let Some(done) = drains.join_next().await {
            if done.unwrap_or(drain::Outcome::Forced) == drain::Outcome::Forced {
                outcome = drain::Outcome::Forced;
            }
        }
        if !kept.is_empty() {
            tracing::info!(
                netns = ?kept,
                "capture rules left in place: traffic of these pods fails until an agent serves them again or they are un-enrolled"
            );
        }
        outcome
    }
}

/// Where a pod's listeners bind: its own addresses in the agent's namespace, or the wildcard
/// address of each of its families inside its namespace.
fn listen_ips(workload: &Workload, net: &Net) -> Vec<IpAddr> {
    match net {
        Net::Host => workload.addresses.clone(),
        Net::Pod(_) => {
            let mut ips = Vec::new();
            if workload.addresses.iter().any(|a| a.is_ipv4()) {
                ips.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            }
            if workload.addresses.iter().any(|a| a.is_ipv6()) {
                ips.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
            }
            ips
        }
    }
}
