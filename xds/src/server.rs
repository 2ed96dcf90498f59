//! A delta ADS server that serves a [`Snapshot`] of resources: the
//! development control plane's xDS side.
//!
//! Every type is served wildcard, as istiod serves node proxies. A stream
//! gets, per type, the resources whose version differs from what the client
//! claimed in `initial_resource_versions` (and removals of claimed names that
//! are gone); after that, each [`Source::publish`] pushes only what changed.
//! ACKs are noted, NACKs logged; neither is answered (as istiod does).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use prost_types::Any;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::address::{encode_service, encode_workload};
use crate::client::MAX_MESSAGE_SIZE;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::State;

/// One served resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Hash of the encoded resource: equal content, equal version, so a
    /// restarted server still recognises what a client holds.
    pub version: String,
    pub resource: Any,
}

/// Everything served: type URL → resource name → entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, BTreeMap<String, Entry>>,
}

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every workload and service of `state` as `istio.workload.Address`
    /// resources, and every policy as an `istio.security.Authorization`.
    pub fn from_state(state: &State) -> Self {
        let mut snapshot = Self::new();
        snapshot
            .types
            .entry(AUTHORIZATION_TYPE_URL.to_owned())
            .or_default();
        snapshot
            .types
            .entry(ADDRESS_TYPE_URL.to_owned())
            .or_default();
        for w in state.workloads() {
            snapshot.insert(ADDRESS_TYPE_URL, w.uid.clone(), &encode_workload(w));
        }
        for s in state.services() {
            snapshot.insert(ADDRESS_TYPE_URL, s.key(), &encode_service(s));
        }
        for p in state.policies().iter() {
            snapshot.insert(
                AUTHORIZATION_TYPE_URL,
                crate::policy::policy_key(&p.namespace, &p.name),
                &crate::authorization::encode(p),
            );
        }
        snapshot
    }

    /// Adds or replaces resource `name` of `type_url`.
    pub fn insert(&mut self, type_url: &str, name: impl Into<String>, message: &impl Message) {
        let value = message.encode_to_vec();
        let version = Sha256::digest(&value)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let entry = Entry {
            version,
            resource: Any {
                type_url: type_url.to_owned(),
                value,
            },
        };
        self.types
            .entry(type_url.to_owned())
            .or_default()
            .insert(name.into(), entry);
    }

    /// The resources of `type_url`, by name.
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Entry>> {
        self.types.get(type_url)
    }
}

/// The snapshot being served; cloning shares it. Publishing pushes the
/// difference to every open stream.
#[derive(Clone)]
pub struct Source {
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    closed: Arc<watch::Sender<bool>>,
}

impl Source {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot: Arc::new(watch::Sender::new(Arc::new(snapshot))),
            closed: Arc::new(watch::Sender::new(false)),
        }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Ends every open stream cleanly, and every later one at once, so a
    /// server draining its connections is not held up by streams that
    /// would otherwise last forever. Clients reconnect elsewhere.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// Reads the mesh file at `path` into a snapshot.
pub fn mesh_snapshot(path: &Path) -> Result<Snapshot, crate::local::LoadError> {
    Ok(Snapshot::from_state(
        &crate::local::load(path)?.into_state(),
    ))
}

/// Publishes the mesh file at `path` to `source` whenever its content
/// changes (checked every `poll`; an edit is published once two reads in a
/// row agree, see [`crate::local::Settle`]), until `shutdown`. A version that
/// fails to load is logged and the last good one stays served. The first
/// settled read is published whatever `source` held before.
pub async fn follow_mesh_file(
    path: PathBuf,
    source: Source,
    poll: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut settle = crate::local::Settle::default();
    // The first tick is at once.
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let read = tokio::fs::read(&path).await;
        let error = read.as_ref().err().map(ToString::to_string);
        if !settle.offer(read.ok()) {
            continue;
        }
        let Some(bytes) = settle.taken() else {
            let error = error.unwrap_or_default();
            tracing::warn!(path = %path.display(), %error, "cannot read the mesh file; still serving the previous one");
            continue;
        };
        match crate::local::parse_file(&path, bytes) {
            Ok(mesh) => {
                tracing::info!(path = %path.display(), "serving the mesh file");
                source.publish(Snapshot::from_state(&mesh.into_state()));
            }
            Err(e) => {
                tracing::error!(error = %e, "mesh file rejected; still serving the previous one")
            }
        }
    }
}

/// Serves delta ADS from `source` on `listener` (TLS when `tls` is given,
/// see [`crate::connection::tls_config`]) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    source: Source,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    crate::connection::serve(listener, tls, service(source), shutdown).await
}

/// The ADS gRPC service alone, to put beside others on one port (istiod
/// serves xDS and the CA on 15012); it answers paths under
/// `/envoy.service.discovery.v3.AggregatedDiscoveryService/`.
pub fn service(source: Source) -> AggregatedDiscoveryServiceServer<Ads> {
    AggregatedDiscoveryServiceServer::new(Ads { source })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// The delta ADS implementation behind [`service`].
pub struct Ads {
    source: Source,
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
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream(
            requests,
            self.source.snapshot.subscribe(),
            self.source.closed.subscribe(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one stream has sent for one type.
#[derive(Default)]
struct Sent {
    versions: HashMap<String, String>,
}

impl Sent {
    /// The response that brings the client from what was sent to `current`,
    /// or `None` when nothing changed.
    fn diff(
        &mut self,
        type_url: &str,
        current: Option<&BTreeMap<String, Entry>>,
        nonce: &mut u64,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let empty = BTreeMap::new();
        let current = current.unwrap_or(&empty);
        let resources: Vec<Resource> = current
            .iter()
            .filter(|(name, e)| self.versions.get(*name) != Some(&e.version))
            .map(|(name, e)| Resource {
                version: e.version.clone(),
                resource: Some(e.resource.clone()),
                name: name.clone(),
                ..Default::default()
            })
            .collect();
        let mut removed: Vec<String> = self
            .versions
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        removed.sort();
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }
        for r in &resources {
            self.versions.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            self.versions.remove(name);
        }
        *nonce += 1;
        Some(DeltaDiscoveryResponse {
            resources,
            type_url: type_url.to_owned(),
            nonce: nonce.to_string(),
            removed_resources: removed,
            ..Default::default()
        })
    }
}

async fn stream(
    mut requests: Streaming<DeltaDiscoveryRequest>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut closed: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut sent: BTreeMap<String, Sent> = BTreeMap::new();
    let mut nonce = 0u64;
    let mut node = String::new();
    if *closed.borrow() {
        return;
    }
    loop {
        tokio::select! {
            changed = closed.changed() => {
                if changed.is_err() || *closed.borrow() {
                    return;
                }
            }
            request = requests.message() => {
                let request = match request {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%node, %status, "ADS stream ended");
                        return;
                    }
                };
                if let Some(n) = &request.node {
                    node.clone_from(&n.id);
                }
                let type_url = request.type_url.clone();
                if !request.response_nonce.is_empty() {
                    match &request.error_detail {
                        Some(e) => tracing::warn!(%node, %type_url, nonce = %request.response_nonce,
                            reason = %e.message, "client NACKed"),
                        None => tracing::debug!(%node, %type_url, nonce = %request.response_nonce, "client ACKed"),
                    }
                    continue;
                }
                if sent.contains_key(&type_url) {
                    // Wildcard only: a later subscription change alters nothing.
                    continue;
                }
                let state = sent.entry(type_url.clone()).or_insert_with(|| Sent {
                    versions: request.initial_resource_versions.into_iter().collect(),
                });
                let snapshot = snapshots.borrow_and_update().clone();
                // Every initial request gets an answer, even an empty one:
                // clients use it as their "synced" signal.
                let response = state.diff(&type_url, snapshot.resources(&type_url), &mut nonce, true);
                if let Some(r) = response && tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                for (type_url, state) in &mut sent {
                    if let Some(r) = state.diff(type_url, snapshot.resources(type_url), &mut nonce, false)
                        && tx.send(Ok(r)).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}
