//! A fake Kubernetes API server for the enrollment tests: namespaces and pods, listed and
//! watched the way the real one serves them (k8s-openapi objects, resource versions, watch
//! events as JSON lines, `410 Gone` for a resource version that is too old), pods patched by
//! JSON merge patch, and `/version`.
//!
//! The test drives it: create, label and delete objects; end every open watch
//! ([`FakeApi::drop_watches`]); forget the event history so resumed watches get `410`
//! ([`FakeApi::compact`]); answer `503` to everything ([`FakeApi::set_down`]). It serves any
//! number of listeners (one per simulated node's namespace) from one state, each until the
//! `FakeApi` drops.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

type Body = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
}

#[derive(Debug, Clone)]
struct Recorded {
    rv: u64,
    kind: Kind,
    /// ADDED, MODIFIED or DELETED.
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    next_uid: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    /// Events after `compacted_at`, oldest first.
    history: VecDeque<Recorded>,
    /// Watches from a resource version below this get `410 Gone`.
    compacted_at: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    down: bool,
    patches: usize,
}

/// What every connection of every listener serves from.
#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// Told of every write, drop and outage.
    changed: Arc<watch::Sender<u64>>,
}

/// The fake API server; its listeners and open watches stop when it drops.
pub struct FakeApi {
    shared: Shared,
    servers: JoinSet<()>,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi {
            shared: Shared {
                inner: Arc::new(Mutex::new(Inner::default())),
                changed: Arc::new(watch::Sender::new(0)),
            },
            servers: JoinSet::new(),
        }
    }
}

/// Stamps `object` with the next resource version and records the event.
fn record(inner: &mut Inner, kind: Kind, event: &'static str, mut object: Value) -> Value {
    inner.rv += 1;
    object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.history.push_back(Recorded {
        rv: inner.rv,
        kind,
        kind_of_event: event,
        object: object.clone(),
    });
    object
}

fn new_uid(inner: &mut Inner) -> String {
    inner.next_uid += 1;
    format!("0f2b6a7e-3c1d-4e5f-8a9b-{:012x}", inner.next_uid)
}

fn pod_node(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or_default()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("just made an object");
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    response
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if self.lock().down {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "down",
            );
        }
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let q = query(&req);
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["version"]) => json_response(
                StatusCode::OK,
                &json!({
                    "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                    "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
                }),
            ),
            (Method::GET, ["api", "v1", "namespaces"]) => self.list_or_watch(Kind::Namespace, &q),
            (Method::GET, ["api", "v1", "pods"]) => self.list_or_watch(Kind::Pod, &q),
            (Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
                let merge = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v == "application/merge-patch+json");
                let (ns, name) = (ns.to_string(), name.to_string());
                let Ok(body) = req.into_body().collect().await else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
                };
                if !merge {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "only merge patches",
                    );
                }
                let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
                };
                self.patch_pod(&ns, &name, &patch)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            ),
        }
    }

    fn list_or_watch(&self, kind: Kind, q: &HashMap<String, String>) -> Response<Body> {
        let node = q
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        if kind == Kind::Pod && q.get("fieldSelector").is_some() && node.is_none() {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "unsupported fieldSelector",
            );
        }
        if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290);
            return self.watch(kind, node, from, Duration::from_secs(timeout));
        }
        let inner = self.lock();
        let (list_kind, items): (&str, Vec<Value>) = match kind {
            Kind::Namespace => (
                "NamespaceList",
                inner.namespaces.values().cloned().collect(),
            ),
            Kind::Pod => (
                "PodList",
                inner
                    .pods
                    .values()
                    .filter(|p| node.as_deref().is_none_or(|n| pod_node(p) == n))
                    .cloned()
                    .collect(),
            ),
        };
        json_response(
            StatusCode::OK,
            &json!({
                "kind": list_kind,
                "apiVersion": "v1",
                "metadata": { "resourceVersion": inner.rv.to_string() },
                "items": items,
            }),
        )
    }

    /// Streams the events after `from` as JSON lines, then waits for more, until the
    /// timeout, a [`FakeApi::drop_watches`] or the client going away.
    fn watch(
        &self,
        kind: Kind,
        node: Option<String>,
        from: u64,
        timeout: Duration,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let api = self.clone();
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let epoch = api.lock().epoch;
            let mut cursor = from;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let (lines, expired): (Vec<Bytes>, bool) = {
                    let inner = api.lock();
                    if inner.epoch != epoch || inner.down {
                        return;
                    }
                    if cursor < inner.compacted_at {
                        let gone = json!({
                            "type": "ERROR",
                            "object": {
                                "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Expired", "code": 410,
                                "message": format!("too old resource version: {cursor} ({})", inner.compacted_at),
                            }
                        });
                        (vec![Bytes::from(format!("{gone}\n"))], true)
                    } else {
                        let lines = inner
                            .history
                            .iter()
                            .filter(|e| e.rv > cursor && e.kind == kind)
                            .filter(|e| node.as_deref().is_none_or(|n| pod_node(&e.object) == n))
                            .map(|e| {
                                let event = json!({ "type": e.kind_of_event, "object": e.object });
                                Bytes::from(format!("{event}\n"))
                            })
                            .collect();
                        cursor = inner.rv;
                        (lines, false)
                    }
                };
                for line in lines {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                if expired {
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let line = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("valid"),
        );
        response
    }

    fn patch_pod(&self, ns: &str, name: &str, patch: &Value) -> Response<Body> {
        let mut inner = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let Some(mut pod) = inner.pods.get(&key).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        };
        merge_patch(&mut pod, patch);
        inner.patches += 1;
        let pod = record(&mut inner, Kind::Pod, "MODIFIED", pod);
        inner.pods.insert(key, pod.clone());
        drop(inner);
        self.notify();
        json_response(StatusCode::OK, &pod)
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    fn notify(&self) {
        self.shared.notify();
    }

    /// Serves `listener` until the `FakeApi` drops.
    pub fn serve(&mut self, listener: TcpListener) {
        let shared = self.shared.clone();
        self.servers.spawn(async move {
            // Dropped with the accept loop: its connections end with it.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
    }

    /// Writes a kubeconfig that points at `http://127.0.0.1:<port>`.
    pub fn write_kubeconfig(path: &Path, port: u16) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    \
                 server: http://127.0.0.1:{port}\ncontexts:\n- name: fake\n  context:\n    \
                 cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  \
                 user: {{}}\n"
            ),
        )
    }

    /// Creates the namespace or replaces its labels.
    pub fn set_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut inner = self.lock();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (event, object) = match inner.namespaces.get(name).cloned() {
            Some(mut ns) => {
                ns["metadata"]["labels"] = json!(labels);
                ("MODIFIED", ns)
            }
            None => {
                let mut ns = Namespace::default();
                ns.metadata.name = Some(name.to_owned());
                ns.metadata.uid = Some(new_uid(&mut inner));
                ns.metadata.labels = Some(labels);
                ("ADDED", serde_json::to_value(ns).expect("serializable"))
            }
        };
        let object = record(&mut inner, Kind::Namespace, event, object);
        inner.namespaces.insert(name.to_owned(), object);
        drop(inner);
        self.notify();
    }

    /// Creates `pod` (uid, resource version assigned) or replaces it; returns its uid.
    pub fn put_pod(&self, mut pod: Pod) -> String {
        let mut inner = self.lock();
        let key = (
            pod.metadata.namespace.clone().expect("pod namespace"),
            pod.metadata.name.clone().expect("pod name"),
        );
        let existing = inner.pods.get(&key).cloned();
        let uid = match &existing {
            Some(old) => old["metadata"]["uid"].as_str().expect("uid").to_owned(),
            None => new_uid(&mut inner),
        };
        pod.metadata.uid = Some(uid.clone());
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = record(
            &mut inner,
            Kind::Pod,
            event,
            serde_json::to_value(pod).expect("serializable"),
        );
        inner.pods.insert(key, object);
        drop(inner);
        self.notify();
        uid
    }

    /// The pod as the API has it now.
    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        let inner = self.lock();
        let value = inner.pods.get(&(ns.to_owned(), name.to_owned()))?.clone();
        serde_json::from_value(value).ok()
    }

    /// Edits a pod's labels (`None` removes one).
    pub fn label_pod(&self, ns: &str, name: &str, key: &str, value: Option<&str>) {
        let mut pod = self.pod(ns, name).expect("pod exists");
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        self.put_pod(pod);
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut inner = self.lock();
        if let Some(pod) = inner.pods.remove(&(ns.to_owned(), name.to_owned())) {
            record(&mut inner, Kind::Pod, "DELETED", pod);
        }
        drop(inner);
        self.notify();
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    pub fn drop_watches(&self) {
        self.lock().epoch += 1;
        self.notify();
    }

    /// Forgets the event history: watches resuming from before now get `410 Gone`.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted_at = inner.rv;
        inner.history.clear();
        drop(inner);
        self.notify();
    }

    /// `true`: every request gets `503` and open watches end.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
        self.notify();
    }

    /// Merge patches applied so far.
    pub fn patches(&self) -> usize {
        self.lock().patches
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Open watches end; the accept loops and their connections are aborted.
        self.set_down(true);
        self.servers.abort_all();
    }
}
