//! A scriptable delta ADS server for tests (feature `testing`): it records
//! every request with its metadata and answers only what the test pushes.
//! A test can push responses, wait for the ACK or NACK of a nonce, end or
//! fail open streams, refuse new ones, delay responses, and stop the whole
//! server (connections cut, port closed) to start it again on the same port.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use prost::Message;
use prost_types::Any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::client::MAX_MESSAGE_SIZE;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};

/// How long any wait of the fake lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Counts streams from 1, across restarts of one [`Fake`].
    pub stream: u64,
    pub request: DeltaDiscoveryRequest,
    pub metadata: MetadataMap,
}

/// What a stream's response channel carries: when to deliver, and what.
type Outgoing = (
    Option<tokio::time::Instant>,
    Result<DeltaDiscoveryResponse, Status>,
);

#[derive(Default)]
struct Script {
    streams: Vec<(u64, mpsc::UnboundedSender<Outgoing>)>,
    opened: u64,
    refuse: Vec<Status>,
    delay: Option<Duration>,
    nonce: u64,
}

/// The fake control plane. Dropping it stops the server.
pub struct Fake {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    script: Arc<Mutex<Script>>,
    seen_tx: mpsc::UnboundedSender<Seen>,
    seen: mpsc::UnboundedReceiver<Seen>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Fake {
    /// Starts on a fresh port of 127.0.0.1.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), tls).await
    }

    /// Starts on `addr` (a loopback address, port 0 for any).
    pub async fn start_at(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let mut fake = Self {
            addr: listener.local_addr()?,
            tls,
            script: Arc::default(),
            seen_tx,
            seen,
            stop: None,
            task: None,
        };
        fake.spawn(listener);
        Ok(fake)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&mut self, listener: TcpListener) {
        let service = AggregatedDiscoveryServiceServer::new(Ads {
            script: self.script.clone(),
            seen: self.seen_tx.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let (stop, stopped) = oneshot::channel();
        let tls = self.tls.clone();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            let _ = crate::connection::serve(listener, tls, service, async {
                let _ = stopped.await;
            })
            .await;
        }));
    }

    /// Kills the server: every connection is cut and the port closed.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.lock().streams.clear();
    }

    /// Starts again on the same address after [`Fake::stop`].
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.spawn(listener);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next request on any stream; panics after [`WAIT`].
    pub async fn next_request(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the fake control plane waited too long for a request")
            .expect("the fake's request channel closed")
    }

    /// The next request if one arrives within `wait`.
    pub async fn try_next_request(&mut self, wait: Duration) -> Option<Seen> {
        tokio::time::timeout(wait, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// Requests until one answers `nonce`; returns it (`error_detail` set
    /// means NACK). Other requests are dropped.
    pub async fn reply_to(&mut self, nonce: &str) -> Seen {
        loop {
            let seen = self.next_request().await;
            if seen.request.response_nonce == nonce {
                return seen;
            }
        }
    }

    /// Waits until `n` streams are open.
    pub async fn wait_streams(&self, n: usize) {
        let wait = async {
            while self
                .lock()
                .streams
                .iter()
                .filter(|(_, s)| !s.is_closed())
                .count()
                < n
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("the fake control plane waited too long for streams");
    }

    /// Sends `response` on every open stream, filling in a fresh nonce if
    /// it has none; returns the nonce.
    pub fn push(&self, mut response: DeltaDiscoveryResponse) -> String {
        let mut script = self.lock();
        if response.nonce.is_empty() {
            script.nonce += 1;
            response.nonce = format!("fake-{}", script.nonce);
        }
        let at = script.delay.map(|d| tokio::time::Instant::now() + d);
        for (_, tx) in &script.streams {
            let _ = tx.send((at, Ok(response.clone())));
        }
        response.nonce
    }

    /// Ends every open stream cleanly (as a server-side GOAWAY would).
    pub fn disconnect(&self) {
        self.lock().streams.clear();
    }

    /// Ends every open stream with `status`.
    pub fn fail_streams(&self, status: Status) {
        for (_, tx) in self.lock().streams.drain(..) {
            let _ = tx.send((None, Err(status.clone())));
        }
    }

    /// Refuses the next stream opens with these statuses, in order.
    pub fn refuse_next(&self, statuses: impl IntoIterator<Item = Status>) {
        self.lock().refuse.extend(statuses);
    }

    /// Delays every later pushed response by `delay` (a slow control plane);
    /// responses stay in order.
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.lock().delay = delay;
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A response of `type_url` carrying `updates` (name, message) and `removals`.
pub fn response<M: Message>(
    type_url: &str,
    updates: impl IntoIterator<Item = (String, M)>,
    removals: impl IntoIterator<Item = String>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        resources: updates
            .into_iter()
            .map(|(name, m)| {
                let value = m.encode_to_vec();
                Resource {
                    version: format!("v{}", value.len()),
                    resource: Some(Any {
                        type_url: type_url.to_owned(),
                        value,
                    }),
                    name,
                    ..Default::default()
                }
            })
            .collect(),
        removed_resources: removals.into_iter().collect(),
        ..Default::default()
    }
}

struct Ads {
    script: Arc<Mutex<Script>>,
    seen: mpsc::UnboundedSender<Seen>,
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let metadata = request.metadata().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut script = self.script.lock().unwrap_or_else(PoisonError::into_inner);
            if !script.refuse.is_empty() {
                return Err(script.refuse.remove(0));
            }
            script.opened += 1;
            let id = script.opened;
            script.streams.push((id, tx));
            id
        };
        let mut requests = request.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let _ = seen.send(Seen {
                    stream: id,
                    request,
                    metadata: metadata.clone(),
                });
            }
        });
        // In order: a delayed response also holds back the ones after it.
        let responses = UnboundedReceiverStream::new(rx).then(|(at, item)| async move {
            if let Some(at) = at {
                tokio::time::sleep_until(at).await;
            }
            item
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
