//! [`FakeCa`]: the development CA server on `127.0.0.1:0`, with a script for tests.
//!
//! It signs with a real [`LocalCa`] through the real [`server::Service`], over the real TLS
//! transport, and lets a test make calls fail, hang until released, take longer, issue
//! certificates that expire fast or name someone else, and see every request it received and
//! how many were in progress at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use identity::Identity;
use rustls_pki_types::CertificateDer;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::istio;
use crate::local::LocalCa;
use crate::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse};
use crate::server::{self, Service};

/// The name the fake's serving certificate is checked against, as for istiod.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// What the fake saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The `authorization` header, verbatim.
    pub authorization: Option<String>,
    /// The `clusterid` header.
    pub cluster_id: Option<String>,
    /// Every header, for extra ones.
    pub headers: http::HeaderMap,
    /// `metadata.ImpersonatedIdentity`, if it was a string.
    pub impersonated: Option<String>,
    /// Whether `metadata` was present at all.
    pub has_metadata: bool,
    pub validity_duration: i64,
    pub csr: String,
}

/// A running fake CA; stops when dropped.
pub struct FakeCa {
    address: SocketAddr,
    ca: Arc<LocalCa>,
    script: Arc<Script>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

struct Script {
    service: Service,
    fail: Mutex<Option<(usize, tonic::Code, String)>>,
    open: watch::Sender<bool>,
    delay: Mutex<Duration>,
    validity: Mutex<Option<Duration>>,
    sign_as: Mutex<Option<Identity>>,
    requests: Mutex<Vec<Recorded>>,
    in_flight: watch::Sender<usize>,
    max_in_flight: AtomicUsize,
}

impl FakeCa {
    /// A fake for trust domain `cluster.local` that checks no token.
    pub async fn start() -> FakeCa {
        FakeCa::start_with(server::Config::new("cluster.local")).await
    }

    /// A fake signing by `config`, with a fresh in-memory root.
    ///
    /// # Panics
    /// If it cannot generate its root or bind to loopback.
    pub async fn start_with(config: server::Config) -> FakeCa {
        let ca = Arc::new(LocalCa::generate().expect("generating the fake CA's root"));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("binding the fake CA to loopback");
        FakeCa::serve_on(listener, ca, config)
    }

    /// A fake at `address` signing with `ca`: a CA that comes back (or comes up late) where
    /// clients already look for it, with the root they already trust.
    pub async fn start_at(
        address: SocketAddr,
        ca: Arc<LocalCa>,
        config: server::Config,
    ) -> std::io::Result<FakeCa> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        Ok(FakeCa::serve_on(listener, ca, config))
    }

    fn serve_on(
        listener: tokio::net::TcpListener,
        ca: Arc<LocalCa>,
        config: server::Config,
    ) -> FakeCa {
        let tls = server::serving_tls(&ca, &server::default_dns_names())
            .expect("issuing the fake CA's serving certificate");
        let address = listener
            .local_addr()
            .expect("a bound listener has an address");
        let script = Arc::new(Script {
            service: Service::new(ca.clone(), config),
            fail: Mutex::new(None),
            open: watch::Sender::new(true),
            delay: Mutex::new(Duration::ZERO),
            validity: Mutex::new(None),
            sign_as: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            in_flight: watch::Sender::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let (shutdown, stop) = oneshot::channel();
        let grpc = IstioCertificateServiceServer::from_arc(script.clone());
        let task = tokio::spawn(server::serve_grpc(listener, tls, grpc, async {
            let _ = stop.await;
        }));
        FakeCa {
            address,
            ca,
            script,
            shutdown: Mutex::new(Some(shutdown)),
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn address(&self) -> http::Uri {
        format!("https://{}", self.address)
            .parse()
            .expect("a socket address makes a URI")
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.address
    }

    /// The root of both the serving certificate and the workload certificates.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots().to_vec()
    }

    /// The CA the fake signs with.
    pub fn ca(&self) -> &Arc<LocalCa> {
        &self.ca
    }

    /// A client configuration for this fake: its address, its root, server name
    /// [`SERVER_NAME`], and a short call timeout.
    pub fn client_config(&self) -> istio::Config {
        let mut config = istio::Config::new(self.address(), self.roots());
        config.server_name = Some(SERVER_NAME.to_owned());
        config.timeout = Duration::from_secs(5);
        config
    }

    /// Makes the next `n` calls fail with `code` and `message` (0: stop failing).
    pub fn fail_next(&self, n: usize, code: tonic::Code, message: &str) {
        *lock(&self.script.fail) = (n > 0).then(|| (n, code, message.to_owned()));
    }

    /// Makes calls wait (after being recorded) until [`FakeCa::release`].
    pub fn hold(&self) {
        self.script.open.send_replace(false);
    }

    pub fn release(&self) {
        self.script.open.send_replace(true);
    }

    /// Makes every call take `delay` longer.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.script.delay) = delay;
    }

    /// Issues certificates valid for `validity` whatever is asked (`None`: as asked).
    pub fn set_validity(&self, validity: Option<Duration>) {
        *lock(&self.script.validity) = validity;
    }

    /// Issues certificates for `identity` whatever is asked (`None`: as the server decides).
    pub fn sign_as(&self, identity: Option<Identity>) {
        *lock(&self.script.sign_as) = identity;
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.script.requests).clone()
    }

    /// Calls in progress now.
    pub fn in_flight(&self) -> usize {
        *self.script.in_flight.borrow()
    }

    /// The most calls ever in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.script.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until `n` calls are in progress at once.
    pub async fn wait_for_in_flight(&self, n: usize) {
        let mut in_flight = self.script.in_flight.subscribe();
        // The sender lives in `self.script`, so the channel cannot close.
        let _ = in_flight.wait_for(|now| *now >= n).await;
    }
}

impl FakeCa {
    /// Stops accepting connections (the address refuses from then on) and returns once the
    /// calls in progress have been answered, as the real server does on shutdown.
    pub async fn stop(&self) {
        if let Some(shutdown) = lock(&self.shutdown).take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeCa {
    fn drop(&mut self) {
        if let Some(shutdown) = lock(&self.shutdown).take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for FakeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCa")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Counts a call as in progress while alive.
struct InFlight<'a>(&'a Script);

impl<'a> InFlight<'a> {
    fn enter(script: &'a Script) -> InFlight<'a> {
        script.in_flight.send_modify(|n| {
            *n += 1;
            script.max_in_flight.fetch_max(*n, Ordering::SeqCst);
        });
        InFlight(script)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Script {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let _in_flight = InFlight::enter(self);
        let body = request.get_ref();
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        lock(&self.requests).push(Recorded {
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
            headers: request.metadata().clone().into_headers(),
            impersonated,
            has_metadata: body.metadata.is_some(),
            validity_duration: body.validity_duration,
            csr: body.csr.clone(),
        });

        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        {
            let mut fail = lock(&self.fail);
            if let Some((n, code, message)) = fail.as_mut() {
                let status = Status::new(*code, message.clone());
                *n -= 1;
                if *n == 0 {
                    *fail = None;
                }
                return Err(status);
            }
        }

        let (mut identity, mut validity) = self.service.decide(request.metadata(), body)?;
        if let Some(other) = lock(&self.sign_as).clone() {
            identity = other;
        }
        if let Some(fast) = *lock(&self.validity) {
            validity = fast;
        }
        let cert_chain = self.service.sign_for(&body.csr, &identity, validity)?;
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
