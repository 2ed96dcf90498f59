//! The delta ADS client: one bidirectional stream to the control plane
//! carrying every watched type, with ACK/NACK by nonce, per-resource
//! versions claimed again on reconnect, and backoff between attempts.
//!
//! Each type is registered with a [`Handler`] for its decoded message; the
//! client knows nothing about what the resources mean. State is never
//! flushed on disconnect: the handler keeps what it holds, and the server
//! learns what that is from `initial_resource_versions`. [`Ready`] turns true
//! once the first response of every watched type has been applied, and stays
//! true across reconnects.

mod backoff;
mod channel;
mod node;

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;

pub use node::NodeInfo;

use crate::handler::{Handler, Rejection, Update};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use crate::proto::google::rpc::Status;
use backoff::Backoff;

/// Largest message accepted: full-mesh snapshots exceed gRPC's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;

/// Where the control plane is and how to prove who we are to it.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` (istiod: port 15012); `http://` only for development.
    pub address: String,
    /// PEM file with the root(s) the server's certificate must chain to; read
    /// on every connect.
    pub root_cert: Option<PathBuf>,
    /// Name to verify in the server certificate instead of the address's host.
    pub server_name: Option<String>,
    /// File holding the bearer token, re-read on every connect; none sends no
    /// `authorization`.
    pub token: Option<PathBuf>,
    /// Sent as the `clusterid` header when not empty.
    pub cluster_id: String,
    /// Further request headers (Istio's `XDS_HEADER_<NAME>`), name → value.
    pub headers: Vec<(String, String)>,
    pub node: NodeInfo,
    pub connect_timeout: Duration,
}

/// Why one connection attempt or stream failed. The client logs it and
/// retries; none of these stop it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane address {0:?} is not an http:// or https:// URL with a host")]
    Address(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("an https:// control plane needs a root certificate file")]
    NoRoot,
    #[error("root certificate file {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("reading the token file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {0} header name or value is not valid in HTTP/2")]
    Header(String),
    #[error("the stream failed: {}: {}", .0.code(), .0.message())]
    Stream(tonic::Status),
}

/// Turns true once every watched type has had its first response applied.
#[derive(Debug, Clone)]
pub struct Ready(watch::Receiver<bool>);

impl Ready {
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until ready; returns at once if the client is gone.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|r| *r).await;
    }
}

/// The delta ADS client. Register types with [`Client::watch`], then
/// [`Client::run`] it.
pub struct Client {
    cfg: Config,
    watches: Vec<Watch>,
    ready: watch::Sender<bool>,
}

struct Watch {
    type_url: String,
    sink: Box<dyn Sink>,
    /// name → version of every resource held; what a reconnect claims.
    versions: HashMap<String, String>,
    synced: bool,
}

impl Client {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            watches: Vec::new(),
            ready: watch::Sender::new(false),
        }
    }

    /// Subscribes (wildcard) to `type_url`, whose resources decode as `T`
    /// and go to `handler`. Initial requests go out in registration order.
    pub fn watch<T, H>(mut self, type_url: impl Into<String>, handler: H) -> Self
    where
        T: prost::Message + Default + 'static,
        H: Handler<T>,
    {
        self.watches.push(Watch {
            type_url: type_url.into(),
            sink: Box::new(Typed {
                handler,
                _type: PhantomData::<fn() -> T>,
            }),
            versions: HashMap::new(),
            synced: false,
        });
        self
    }

    pub fn ready(&self) -> Ready {
        Ready(self.ready.subscribe())
    }

    /// Connects, streams and reconnects until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        loop {
            let mut received = false;
            let result = tokio::select! {
                _ = &mut shutdown => return,
                r = self.session(&mut received) => r,
            };
            if received {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(()) => {
                    tracing::info!(address = %self.cfg.address, ?delay, "xDS stream ended; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(address = %self.cfg.address, error = %e, ?delay, "xDS stream failed; retrying")
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection and stream, until it ends. Sets `received` once a
    /// response arrived, which resets the backoff.
    async fn session(&mut self, received: &mut bool) -> Result<(), ClientError> {
        let channel = channel::connect(&self.cfg).await?;
        let mut ads = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let (tx, rx) = mpsc::unbounded_channel();
        let node = self.cfg.node.to_proto();
        for w in &self.watches {
            let request = DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: w.type_url.clone(),
                initial_resource_versions: w.versions.clone(),
                ..Default::default()
            };
            // The receiver lives in `request` below; it cannot be gone yet.
            let _ = tx.send(request);
        }
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(path) = &self.cfg.token {
            let token = std::fs::read_to_string(path).map_err(|source| ClientError::Token {
                path: path.clone(),
                source,
            })?;
            let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| ClientError::Header("authorization".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        if !self.cfg.cluster_id.is_empty() {
            let value = MetadataValue::try_from(self.cfg.cluster_id.as_str())
                .map_err(|_| ClientError::Header("clusterid".into()))?;
            request.metadata_mut().insert("clusterid", value);
        }
        for (name, value) in &self.cfg.headers {
            let bad = || ClientError::Header(name.clone());
            let key =
                tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| bad())?;
            let value = MetadataValue::try_from(value.as_str()).map_err(|_| bad())?;
            request.metadata_mut().insert(key, value);
        }
        let mut responses = ads
            .delta_aggregated_resources(request)
            .await
            .map_err(ClientError::Stream)?
            .into_inner();
        tracing::info!(address = %self.cfg.address, "xDS stream open");
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(status) => return Err(ClientError::Stream(status)),
            };
            *received = true;
            let reply = self.handle(response);
            if tx.send(reply).is_err() {
                return Ok(());
            }
        }
    }

    /// Applies one response and builds its ACK or NACK.
    fn handle(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            resources,
            type_url,
            nonce,
            removed_resources,
            ..
        } = response;
        let mut reply = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce,
            ..Default::default()
        };
        let Some(watch) = self.watches.iter_mut().find(|w| w.type_url == type_url) else {
            tracing::warn!(%type_url, "response for a type not subscribed to; acknowledging it");
            return reply;
        };
        let (applied, rejected) = watch.sink.apply(&type_url, resources, &removed_resources);
        for (name, version) in applied {
            watch.versions.insert(name, version);
        }
        // Not claimed on reconnect, so the server sends them again.
        for r in &rejected {
            watch.versions.remove(&r.name);
        }
        for name in &removed_resources {
            watch.versions.remove(name);
        }
        tracing::debug!(%type_url, held = watch.versions.len(), removed = removed_resources.len(),
            rejected = rejected.len(), "applied xDS response");
        if !rejected.is_empty() {
            let message = rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(%type_url, %message, "NACKing xDS response");
            reply.error_detail = Some(Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            });
        }
        if !watch.synced {
            watch.synced = true;
            if self.watches.iter().all(|w| w.synced) {
                tracing::info!(address = %self.cfg.address, "xDS synced: first response of every type applied");
                self.ready.send_replace(true);
            }
        }
        reply
    }
}

/// A handler behind the type it decodes, so the client holds many types.
trait Sink: Send + Sync {
    /// Decodes and applies; returns (name, version) of the updates applied
    /// and the rejections.
    fn apply(
        &self,
        type_url: &str,
        resources: Vec<Resource>,
        removals: &[String],
    ) -> (Vec<(String, String)>, Vec<Rejection>);
}

struct Typed<T, H> {
    handler: H,
    _type: PhantomData<fn() -> T>,
}

impl<T, H> Sink for Typed<T, H>
where
    T: prost::Message + Default + 'static,
    H: Handler<T>,
{
    fn apply(
        &self,
        type_url: &str,
        resources: Vec<Resource>,
        removals: &[String],
    ) -> (Vec<(String, String)>, Vec<Rejection>) {
        let mut rejected = Vec::new();
        let mut updates = Vec::with_capacity(resources.len());
        let mut versions = Vec::with_capacity(resources.len());
        for r in resources {
            let decoded = match &r.resource {
                None => Err("the resource has no payload".to_owned()),
                Some(any) if any.type_url != type_url => Err(format!(
                    "payload type {} does not match the response type {type_url}",
                    any.type_url
                )),
                Some(any) => T::decode(any.value.as_slice())
                    .map_err(|e| format!("cannot decode the payload: {e}")),
            };
            match decoded {
                Ok(resource) => {
                    versions.push((r.name.clone(), r.version));
                    updates.push(Update {
                        name: r.name,
                        resource,
                    });
                }
                Err(reason) => rejected.push(Rejection {
                    name: r.name,
                    reason,
                }),
            }
        }
        let refused = self.handler.apply(updates, removals);
        versions.retain(|(name, _)| !refused.iter().any(|r| &r.name == name));
        rejected.extend(refused);
        (versions, rejected)
    }
}
