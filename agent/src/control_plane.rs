//! `ambientd dev-control-plane`: a development stand-in for istiod. It serves a mesh file over
//! delta ADS (pushing changes when the file changes) and signs CSRs with the built-in CA, on
//! one TLS port with istiod's RPC paths, like istiod's 15012. For demos, tests and interop
//! checks only: production uses istiod.
//!
//! The serving certificate is issued by the same root the workload certificates chain to, so
//! agents verify it with the CA's `root-cert.pem` (`XDS_ROOT_CA`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use ca_client::LocalCa;
use ca_client::server::{self as ca_server, Auth};
use hyper::body::Incoming;
use tokio::sync::watch;

/// Requests under this path go to the CA; everything else to ADS.
const CA_SERVICE_PATH: &str = "/istio.v1.auth.IstioCertificateService/";

#[derive(Debug, Clone)]
pub struct Config {
    pub mesh_file: PathBuf,
    pub listen: SocketAddr,
    /// The CA's state directory (root created on first use), shared with nothing else.
    pub ca_dir: PathBuf,
    /// Names on the serving certificate (DNS names or IPs).
    pub dns_names: Vec<String>,
    pub trust_domain: String,
    /// Accepted bearer tokens and the identity each stands for; empty: tokens are not checked.
    pub tokens: Vec<(String, identity::Identity)>,
    /// How often the mesh file is checked for changes.
    pub poll: Duration,
}

/// A running development control plane.
pub struct Running {
    pub addr: SocketAddr,
    /// The root agents must trust (`XDS_ROOT_CA` / `CA_ROOT_CA`).
    pub root_cert: PathBuf,
    stop: watch::Sender<bool>,
    source: xds::server::Source,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Ends every stream and stops serving.
    pub async fn stop(self) {
        // xDS streams never end by themselves; closing the source ends them.
        self.source.close();
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let ca = Arc::new(
        LocalCa::load_or_init(&cfg.ca_dir)
            .with_context(|| format!("loading the CA in {}", cfg.ca_dir.display()))?,
    );
    let snapshot = xds::server::mesh_snapshot(&cfg.mesh_file)?;
    let source = xds::server::Source::new(snapshot);
    let tls = ca_server::serving_tls(&ca, &cfg.dns_names).context("serving certificate")?;
    let mut ca_cfg = ca_server::Config::new(cfg.trust_domain.clone());
    if !cfg.tokens.is_empty() {
        ca_cfg.auth = Auth::Tokens(cfg.tokens.iter().cloned().collect());
    }
    let routes = Routes {
        ads: xds::server::service(source.clone()),
        ca: ca_server::Service::new(ca, ca_cfg).into_grpc(),
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let follower = xds::server::follow_mesh_file(
        cfg.mesh_file.clone(),
        source.clone(),
        cfg.poll,
        until_stopped(stopped.clone()),
    );
    let server = ca_server::serve_grpc(listener, tls, routes, until_stopped(stopped));
    let task = tokio::spawn(async move {
        tokio::join!(follower, server);
    });
    tracing::info!(%addr, mesh = %cfg.mesh_file.display(), "development control plane serving xDS and the CA");
    Ok(Running {
        addr,
        root_cert: cfg.ca_dir.join(ca_client::local::ROOT_CERT),
        stop,
        source,
        task,
    })
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = start(cfg).await?;
    println!(
        "development control plane on {} (root: {}); production uses istiod",
        running.addr,
        running.root_cert.display()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    running.stop().await;
    Ok(())
}

/// Sends CA calls to the CA and the rest to ADS, as istiod does on one port.
#[derive(Clone)]
struct Routes<A, C> {
    ads: A,
    ca: C,
}

type Response = http::Response<tonic::body::Body>;

impl<A, C> tower::Service<http::Request<Incoming>> for Routes<A, C>
where
    A: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    A::Future: Send + 'static,
    C: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    C::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Generated gRPC services are always ready; each call readies its own clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        use tower::ServiceExt;
        if req.uri().path().starts_with(CA_SERVICE_PATH) {
            let ca = self.ca.clone();
            Box::pin(async move { ca.oneshot(req).await })
        } else {
            let ads = self.ads.clone();
            Box::pin(async move { ads.oneshot(req).await })
        }
    }
}
