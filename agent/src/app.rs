//! Wiring and lifecycle: load the mesh, set up certificates, enroll this node's pods (capture
//! rules and listeners, [`pods`]) from the enrollment source, watch the mesh file (polled, and
//! on SIGHUP) and re-check inbound connections when it changes, run until told to stop, then
//! drain. The one place that spawns long-lived tasks.

pub mod pods;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ca_client::{Cache, CertificateSink, CertificateSource, LocalCa};
use identity::{Identity, WorkloadCertificate};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::config::{CaSource, Config, Enrollment, Mode};
use crate::drain;
use crate::enrollment::Source;
use crate::enrollment::kube::{self as kube_source, KubeSource};
use crate::enrollment::mesh::MeshSource;
use crate::events::{ConnectionRecord, Events};
use crate::mesh;
use crate::netns::Home;
use crate::proxy::authorization::{self, Registry};
use crate::proxy::{self, Proxy, pool::Pool, socks5};
use crate::readiness::{self, Readiness};
use crate::tls::Credentials;
use pods::Pods;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Outbound,
    InboundPlaintext,
    Hbone,
    Socks5,
    Readiness,
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
    pods: Arc<Pods>,
    /// Listeners that belong to no pod (SOCKS5, readiness).
    own: Vec<Listener>,
    readiness: Readiness,
    mesh_file: PathBuf,
    mode: Mode,
    enrollment: tokio::task::JoinHandle<()>,
    trigger: drain::Trigger,
    tasks: JoinSet<()>,
    mesh_status: watch::Receiver<mesh::Status>,
    /// Istio mode: whether the first response of every xDS type was applied.
    xds_ready: Option<xds::client::Ready>,
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

/// Where the mesh state and certificates come from, before anything is served.
struct Control {
    state: xds::Store,
    ca: Arc<dyn CertificateSource>,
    /// The mesh file's watcher (local mode).
    watcher: Option<mesh::Watcher>,
    /// The delta xDS client, not yet running (istio mode).
    xds: Option<xds::client::Client>,
}

async fn control(cfg: &Config) -> anyhow::Result<Control> {
    match &cfg.mode {
        Mode::Local => {
            // Before the load: an edit racing the start is then seen as a change.
            let watcher = mesh::Watcher::new(&cfg.mesh_file);
            let mesh = xds::local::load(&cfg.mesh_file)?;
            let ca = match &cfg.ca.source {
                CaSource::Dir(dir) => LocalCa::load_or_init(dir),
                CaSource::Files(files) => LocalCa::load(files),
            }
            .context("loading the built-in CA")?
            .with_validity(cfg.ca.cert_ttl);
            Ok(Control {
                state: xds::Store::new(mesh.into_state()),
                ca: Arc::new(ca),
                watcher: Some(watcher),
                xds: None,
            })
        }
        Mode::Istio(istio) => {
            // Workloads, services and policies arrive over xDS; pods enroll as they do.
            let state = xds::Store::default();
            // Addresses and authorization policies, both into the store.
            let client = xds::client::Client::new(istio.xds.clone()).watch_store(&state);
            let ca = ca_client::istio::Client::new(istio.ca.clone())
                .context("configuring the Istio CA client")?;
            tracing::info!(xds = %istio.xds.address, ca = %istio.ca.address, "istio mode");
            Ok(Control {
                state,
                ca: Arc::new(ca),
                watcher: None,
                xds: Some(client),
            })
        }
    }
}

/// Loads everything, enrolls this node's pods (capture rules and listeners) and returns the
/// running agent. Every problem in the configuration or with a pod present at start is an
/// error here, before anything is served.
pub async fn start(cfg: Config) -> anyhow::Result<Agent> {
    crate::proxy::delivery::warn_if_ephemeral(&cfg.proxy.delivery_ports);
    let control = control(&cfg).await?;
    let Control {
        state,
        ca,
        watcher,
        xds,
    } = control;
    let mesh_status = watcher
        .as_ref()
        .map(mesh::Watcher::status)
        .unwrap_or_else(|| watch::Sender::new(mesh::Status::default()).subscribe());
    let creds = Arc::new(Credentials::new());
    let certs = Cache::new(ca, Arc::new(TlsSink(creds.clone())));
    let node = cfg.proxy.node_name.clone();
    let local = state.workloads_on_node(&node);
    if local.is_empty() && matches!(cfg.mode, Mode::Local) {
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
        state: state.clone(),
        creds,
        certs,
        events: Events::default(),
        live_inbound: Arc::new(Registry::default()),
    });
    let home = Home::current()?;
    let pods = Arc::new(Pods::new(
        proxy.clone(),
        cfg.capture.clone(),
        home,
        cfg.drain_deadline,
    ));
    let readiness = Readiness::new();
    let xds_ready = xds.as_ref().map(xds::client::Client::ready);
    let enrollment = match &cfg.enrollment {
        Enrollment::MeshFile => {
            // A mistake in the file is an error before anything is served.
            let mut source = MeshSource::new(state, node.clone());
            let initial = source.initial().await?;
            for pod in initial {
                if let Err(e) = pods.enroll(pod).await {
                    pods.unenroll_all().await;
                    return Err(e.into());
                }
            }
            pods.refresh_wanted();
            tokio::spawn(follow(source, pods.clone()))
        }
        Enrollment::Kubernetes(kube) => {
            let client = kube_source::client(kube).await?;
            let mut source = KubeSource::new(
                client,
                kube.clone(),
                &node,
                &cfg.proxy.cluster_id,
                state,
                &readiness,
            );
            let pods = pods.clone();
            let mut xds_ready = xds_ready.clone();
            tokio::spawn(async move {
                // Pods map to workloads: in istio mode, wait for them to arrive first.
                if let Some(ready) = &mut xds_ready {
                    ready.wait().await;
                }
                match source.initial().await {
                    Ok(initial) => {
                        for pod in initial {
                            let outcome =
                                pods.apply(crate::enrollment::Change::Enrolled(pod)).await;
                            source.report(outcome.map_err(|e| e.to_string()));
                        }
                        follow(source, pods).await;
                    }
                    Err(e) => tracing::error!(error = %e, "enrollment stopped"),
                }
            })
        }
    };
    let (trigger, watch) = drain::channel();
    let mut tasks = JoinSet::new();
    tasks.spawn(proxy.pool.reaper());
    // Neither holds a drain watch: they run until the agent's tasks are shut down.
    tasks.spawn(authorization::recheck_on_change(
        proxy.live_inbound.clone(),
        proxy.state.clone(),
    ));
    if let (Some(watcher), Some(interval)) = (watcher, cfg.mesh_poll) {
        tasks.spawn(watcher.run(proxy.state.clone(), interval));
    }
    if let Some(client) = xds {
        let stop = watch.clone();
        tasks.spawn(async move { client.run(async move { stop.draining().await }).await });
    }
    if let Some(mut ready) = xds_ready.clone() {
        let block = readiness.block("xds: first sync");
        tasks.spawn(async move {
            ready.wait().await;
            drop(block);
        });
    }
    let mut own = Vec::new();
    if let Some(addr) = cfg.readiness {
        let listener =
            proxy::bind(addr).with_context(|| format!("binding the readiness listener {addr}"))?;
        let local = listener.local_addr()?;
        own.push(Listener {
            role: Role::Readiness,
            workload: None,
            addr: local,
        });
        let stop = watch.clone();
        tasks.spawn(readiness::serve(listener, readiness.clone(), async move {
            stop.draining().await
        }));
        tracing::info!(role = ?Role::Readiness, addr = %local, path = readiness::PATH, "listening");
    }
    if let Some(addr) = cfg.socks5 {
        let listener =
            proxy::bind(addr).with_context(|| format!("binding the SOCKS5 listener {addr}"))?;
        own.push(Listener {
            role: Role::Socks5,
            workload: None,
            addr: listener.local_addr()?,
        });
        let p = proxy.clone();
        tasks.spawn(proxy::serve(listener, watch.clone(), move |s, peer| {
            socks5::handle(p.clone(), s, peer)
        }));
        tracing::info!(role = ?Role::Socks5, addr = %own.last().expect("just pushed").addr, "listening");
    }
    drop(watch);
    Ok(Agent {
        proxy,
        pods,
        own,
        readiness,
        mesh_file: cfg.mesh_file,
        mode: cfg.mode,
        enrollment,
        trigger,
        tasks,
        mesh_status,
        xds_ready,
    })
}

impl Agent {
    /// Every listener: the enrolled pods', then the agent's own (SOCKS5).
    pub fn listeners(&self) -> Vec<Listener> {
        let mut all = self.pods.listeners();
        all.extend(self.own.iter().cloned());
        all
    }

    /// The address of the first listener with this role.
    pub fn listener(&self, role: Role) -> Option<SocketAddr> {
        self.listeners()
            .into_iter()
            .find(|l| l.role == role)
            .map(|l| l.addr)
    }

    /// Whether the mesh state is in: always in local mode; in istio mode once the first
    /// response of every xDS type was applied (it stays so across reconnects).
    pub fn xds_synced(&self) -> bool {
        self.xds_ready.as_ref().is_none_or(|r| r.is_ready())
    }

    /// Whether the agent reports ready on `/healthz/ready`, and what holds it back.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
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

    /// Re-reads the mesh file; pods that joined or left this node are enrolled or
    /// un-enrolled by the enrollment task. A file with errors changes nothing.
    pub fn reload(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.mode, Mode::Local),
            "istio mode: the mesh comes from xDS; there is no file to reload"
        );
        let mesh = xds::local::load(&self.mesh_file)?;
        // The enrollment source and the policy re-check follow the store's change notice.
        drop(self.proxy.state.replace(mesh.into_state()));
        tracing::info!(file = %self.mesh_file.display(), "mesh file reloaded");
        Ok(())
    }

    /// Un-enrolls every pod and removes its capture rules (the demo's clean-up).
    pub async fn unenroll_all(&self) {
        self.pods.unenroll_all().await;
    }

    /// Stops accepting, lets open connections finish until `deadline`, then closes them.
    /// Capture rules stay in place (see [`pods`]).
    pub async fn shutdown(mut self, deadline: Duration) -> drain::Outcome {
        self.enrollment.abort();
        let (own, pods) = tokio::join!(self.trigger.drain(deadline), self.pods.shutdown(deadline));
        self.tasks.shutdown().await;
        if own == drain::Outcome::Forced {
            own
        } else {
            pods
        }
    }
}

/// Acts on every change of `source` and tells it how each went, until the source ends.
async fn follow(mut source: impl Source, pods: Arc<Pods>) {
    while let Some(change) = source.next().await {
        let outcome = pods.apply(change).await;
        source.report(outcome.map_err(|e| e.to_string()));
    }
}

/// Raises the soft open-files limit to the hard one: every proxied connection holds two
/// descriptors, and the usual soft limit (1024) would cap a node at a few hundred. Returns
/// the soft limit before and after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard.max(soft)))
}

/// Runs the agent until SIGTERM or SIGINT, then drains; SIGHUP re-reads the mesh file.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let deadline = cfg.drain_deadline;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let agent = start(cfg).await?;
    let readiness = agent.readiness().clone();
    tokio::spawn(async move {
        readiness.wait_ready().await;
        // Start-up code and data are done with: out of RSS (see `residency`).
        let released = crate::residency::release_startup_pages().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "start-up pages not released");
            crate::residency::Released::default()
        });
        tracing::info!(
            released_kib = released.bytes / 1024,
            mappings = released.mappings,
            "agent ready"
        );
    });
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = int.recv() => { tracing::info!("SIGINT received"); break }
            _ = hup.recv() => {
                if let Err(e) = agent.reload() {
                    tracing::error!(error = %crate::describe(&e), "mesh file not reloaded; keeping the current state");
                }
            }
        }
    }
    tracing::info!(deadline = ?deadline, "draining: no new connections; open ones may finish");
    let outcome = agent.shutdown(deadline).await;
    tracing::info!(?outcome, "stopped");
    Ok(())
}
