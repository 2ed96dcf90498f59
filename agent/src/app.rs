//! Wiring and lifecycle: load the mesh, set up certificates, open every local workload's
//! listeners, watch the mesh file and re-check inbound connections when it changes, run until
//! told to stop, then drain. The one place that spawns long-lived tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ca_client::{Cache, CertificateSink, LocalCa};
use identity::{Identity, WorkloadCertificate};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::config::{CaSource, Config};
use crate::drain;
use crate::events::{ConnectionRecord, Events};
use crate::mesh;
use crate::proxy::authorization::{self, Registry};
use crate::proxy::{self, Proxy, inbound, outbound, plaintext, pool::Pool, socks5};
use crate::tls::Credentials;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Outbound,
    InboundPlaintext,
    Hbone,
    Socks5,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub role: Role,
    /// The workload it serves (none for SOCKS5).
    pub workload: Option<String>,
    pub addr: SocketAddr,
}

/// A running agent.
pub struct Agent {
    proxy: Arc<Proxy>,
    listeners: Vec<Listener>,
    trigger: drain::Trigger,
    tasks: JoinSet<()>,
    mesh_status: watch::Receiver<mesh::Status>,
}

/// The TLS side learns of new and renewed certificates through the CA client's sink.
struct TlsSink(Arc<Credentials>);

impl CertificateSink for TlsSink {
    fn publish(&self, cert: Arc<WorkloadCertificate>) {
        let id = cert.identity.clone();
        if let Err(e) = self.0.publish(cert) {
            tracing::error!(identity = %id, error = %e, "certificate cannot be used for TLS");
        }
    }

    fn forget(&self, identity: &Identity) {
        self.0.forget(identity);
    }
}

/// Loads everything, opens the listeners and returns the running agent. Every problem in the
/// configuration is an error here, before anything is served.
pub async fn start(cfg: Config) -> anyhow::Result<Agent> {
    // Before the load: an edit racing the start is then seen as a change.
    let watcher = mesh::Watcher::new(&cfg.mesh_file);
    let mesh_status = watcher.status();
    let mesh = xds::local::load(&cfg.mesh_file)?;
    let state = xds::Store::new(mesh.into_state());
    let ca = match &cfg.ca.source {
        CaSource::Dir(dir) => LocalCa::load_or_init(dir),
        CaSource::Files(files) => LocalCa::load(files),
    }
    .context("loading the built-in CA")?
    .with_validity(cfg.ca.cert_ttl);
    let creds = Arc::new(Credentials::new());
    let certs = Cache::new(Arc::new(ca), Arc::new(TlsSink(creds.clone())));
    let node = cfg.proxy.node_name.clone();
    let local = state.workloads_on_node(&node);
    if local.is_empty() {
        tracing::warn!(node = %node, "no workload in the mesh file runs on this node");
    }
    for w in &local {
        let id = w.identity();
        certs
            .get(id)
            .await
            .with_context(|| format!("issuing a certificate for {id} (workload {})", w.uid))?;
    }
    let proxy = Arc::new(Proxy {
        pool: Pool::new(cfg.proxy.pool.clone()),
        cfg: cfg.proxy.clone(),
        state,
        creds,
        certs,
        events: Events::default(),
        live_inbound: Arc::new(Registry::default()),
    });
    let (trigger, watch) = drain::channel();
    let mut tasks = JoinSet::new();
    // Neither holds a drain watch: they run until the agent's tasks are shut down.
    tasks.spawn(authorization::recheck_on_change(
        proxy.live_inbound.clone(),
        proxy.state.clone(),
    ));
    match cfg.mesh_poll {
        Some(interval) => {
            tasks.spawn(watcher.run(proxy.state.clone(), node.clone(), interval));
        }
        None => drop(watcher),
    }
    let mut listeners = Vec::new();
    let ports = proxy.cfg.ports;
    for w in local {
        for &ip in &w.addresses {
            for (role, port) in [
                (Role::Hbone, ports.hbone),
                (Role::Outbound, ports.outbound),
                (Role::InboundPlaintext, ports.inbound_plaintext),
            ] {
                let addr = SocketAddr::new(ip, port);
                let listener = proxy::bind(addr).with_context(|| {
                    format!("binding {role:?} listener {addr} of workload {}", w.uid)
                })?;
                listeners.push(Listener {
                    role,
                    workload: Some(w.uid.clone()),
                    addr: listener.local_addr()?,
                });
                let (p, w, d) = (proxy.clone(), w.clone(), watch.clone());
                match role {
                    Role::Hbone => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            inbound::handle(p.clone(), w.clone(), s, peer, d.clone())
                        }))
                    }
                    Role::Outbound => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            outbound::handle(p.clone(), w.clone(), s, peer)
                        }))
                    }
                    Role::InboundPlaintext => {
                        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
                            plaintext::handle(p.clone(), w.clone(), s, peer)
                        }))
                    }
                    Role::Socks5 => unreachable!("not a workload listener"),
                };
            }
        }
    }
    if let Some(addr) = cfg.socks5 {
        let listener =
            proxy::bind(addr).with_context(|| format!("binding the SOCKS5 listener {addr}"))?;
        listeners.push(Listener {
            role: Role::Socks5,
            workload: None,
            addr: listener.local_addr()?,
        });
        let p = proxy.clone();
        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
            socks5::handle(p.clone(), s, peer)
        }));
    }
    for l in &listeners {
        tracing::info!(role = ?l.role, addr = %l.addr, workload = l.workload.as_deref().unwrap_or("-"), "listening");
    }
    drop(watch);
    Ok(Agent {
        proxy,
        listeners,
        trigger,
        tasks,
        mesh_status,
    })
}

impl Agent {
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The address of the first listener with this role.
    pub fn listener(&self, role: Role) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.role == role)
            .map(|l| l.addr)
    }

    pub fn pool(&self) -> &Pool {
        &self.proxy.pool
    }

    /// Reloads of the mesh file so far.
    pub fn mesh_status(&self) -> watch::Receiver<mesh::Status> {
        self.mesh_status.clone()
    }

    /// Inbound connections open now.
    pub fn live_inbound(&self) -> usize {
        self.proxy.live_inbound.len()
    }

    /// Every connection's record as it ends.
    pub fn events(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.proxy.events.subscribe()
    }

    /// Stops accepting, lets open connections finish until `deadline`, then closes them.
    pub async fn shutdown(mut self, deadline: Duration) -> drain::Outcome {
        let outcome = self.trigger.drain(deadline).await;
        self.tasks.shutdown().await;
        outcome
    }
}

/// Runs the agent until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let deadline = cfg.drain_deadline;
    let agent = start(cfg).await?;
    shutdown_signal().await?;
    tracing::info!(deadline = ?deadline, "draining: no new connections; open ones may finish");
    let outcome = agent.shutdown(deadline).await;
    tracing::info!(?outcome, "stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
