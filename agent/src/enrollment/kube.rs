//! Enrollment from the Kubernetes API: watches every namespace and the pods scheduled on this
//! node (`spec.nodeName`), and enrolls the pods the [`ledger`] wants, each in the network
//! namespace its processes have in the host's `/proc` ([`super::procfs`]).
//!
//! The source drives both watches (kube's `watcher`, with its backoff; a dropped watch resumes
//! from the last resource version, a `410 Gone` relists), follows the mesh state's change
//! notice (a pod waiting for its workload), retries failed pods on their backoff, and records
//! on each pod whether its traffic is captured (`ambient.istio.io/redirection: enabled`) by a
//! merge patch, once the agent reported the rules in place. On a restart the first lists are
//! the reconcile: pods already captured are enrolled again (re-applying rules is idempotent,
//! which also repairs partial ones), annotated pods that left the mesh meanwhile are cleaned
//! up. It holds the agent unready until its first pass is done, and again while the API has
//! been out of reach for longer than `unready_after`.

pub mod ledger;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use tokio::sync::watch;

use super::{BoxFuture, Change, Pod, Source, SourceError};
use crate::config::KubernetesConfig;
use crate::readiness::{Block, Readiness};
use ledger::{Ledger, PodView, REDIRECTION, REDIRECTION_ENABLED, namespace_is_ambient};

/// Attempts at patching a pod's annotation before waiting for the pod to change.
const PATCH_ATTEMPTS: u32 = 5;
/// Bound on one API call of ours (patches, the reachability probe).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the API is probed while the watches fail.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

const SOURCE: &str = "kubernetes";

fn error(message: impl std::fmt::Display) -> SourceError {
    SourceError {
        source_name: SOURCE,
        message: message.to_string(),
    }
}

/// A client for the API: from the given kubeconfig files (merged), else kube's inference
/// (in-cluster service account, else `KUBECONFIG` / `~/.kube/config`).
pub async fn client(cfg: &KubernetesConfig) -> Result<kube::Client, SourceError> {
    let config = if cfg.kubeconfig.is_empty() {
        kube::Config::infer()
            .await
            .map_err(|e| error(format!("no Kubernetes API configuration: {e}")))?
    } else {
        let mut merged: Option<kube::config::Kubeconfig> = None;
        for path in &cfg.kubeconfig {
            let one = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| error(format!("kubeconfig {}: {e}", path.display())))?;
            merged = Some(match merged {
                None => one,
                Some(m) => m
                    .merge(one)
                    .map_err(|e| error(format!("kubeconfig {}: {e}", path.display())))?,
            });
        }
        let kubeconfig = merged.expect("at least one kubeconfig");
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| error(format!("kubeconfig: {e}")))?
    };
    let mut config = config;
    // kube retries 503s up to 15 times over minutes inside one call: a watch would then
    // report nothing while the API is away. The watcher's backoff and ours retry instead.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| error(format!("Kubernetes API client: {e}")))
}

enum Update {
    Namespace(Box<Event<Namespace>>),
    Pod(Box<Event<KubePod>>),
}

/// A finished patch: pod UID, the annotation's new presence, and how it went.
type Patched = (String, bool, Result<(), String>);

pub struct KubeSource {
    client: kube::Client,
    cfg: KubernetesConfig,
    node: String,
    store: xds::Store,
    store_changes: watch::Receiver<u64>,
    updates: BoxStream<'static, Result<Update, watcher::Error>>,
    ledger: Ledger,
    /// Lists being received (between `Init` and `InitDone`).
    ns_list: Option<BTreeMap<String, bool>>,
    pod_list: Option<Vec<(PodView, bool)>>,
    ns_synced: bool,
    pods_synced: bool,
    patches: FuturesUnordered<BoxFuture<'static, Patched>>,
    patching: BTreeSet<String>,
    /// Failed patches per pod UID: attempts, and when the pod was last seen (a change resets).
    patch_failures: BTreeMap<String, u32>,
    readiness: Readiness,
    first_pass: Option<Block>,
    /// Since when the watches fail without the API answering.
    failing_since: Option<Instant>,
    unreachable: Option<Block>,
}

impl KubeSource {
    /// Starts watching through `client`; nothing is asked of the API before
    /// [`Source::initial`]. Holds the agent unready until the first pass is done.
    pub fn new(
        client: kube::Client,
        cfg: KubernetesConfig,
        node: &str,
        cluster_id: &str,
        store: xds::Store,
        readiness: &Readiness,
    ) -> Self {
        let namespaces = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|e| e.map(|event| Update::Namespace(Box::new(event))));
        let pods = watcher(
            Api::<KubePod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        )
        .default_backoff()
        .map(|e| e.map(|event| Update::Pod(Box::new(event))));
        KubeSource {
            client,
            cfg,
            node: node.to_owned(),
            store_changes: store.subscribe(),
            store,
            updates: stream::select(namespaces, pods).boxed(),
            ledger: Ledger::new(cluster_id, node),
            ns_list: None,
            pod_list: None,
            ns_synced: false,
            pods_synced: false,
            patches: FuturesUnordered::new(),
            patching: BTreeSet::new(),
            patch_failures: BTreeMap::new(),
            readiness: readiness.clone(),
            first_pass: Some(readiness.block("kubernetes: first enrollment pass")),
            failing_since: None,
            unreachable: None,
        }
    }

    fn on_update(&mut self, update: Update) {
        self.api_answered();
        match update {
            Update::Namespace(event) => match *event {
                Event::Init => self.ns_list = Some(BTreeMap::new()),
                Event::InitApply(ns) => {
                    if let (Some(list), Some(name)) = (&mut self.ns_list, &ns.metadata.name) {
                        list.insert(name.clone(), namespace_is_ambient(&ns));
                    }
                }
                Event::InitDone => {
                    self.ledger
                        .replace_namespaces(self.ns_list.take().unwrap_or_default());
                    self.ns_synced = true;
                }
                Event::Apply(ns) => {
                    if let Some(name) = &ns.metadata.name {
                        self.ledger.set_namespace(name, namespace_is_ambient(&ns));
                    }
                }
                Event::Delete(ns) => {
                    if let Some(name) = &ns.metadata.name {
                        self.ledger.remove_namespace(name);
                    }
                }
            },
            Update::Pod(event) => match *event {
                Event::Init => self.pod_list = Some(Vec::new()),
                Event::InitApply(pod) => {
                    if let (Some(list), Some(view)) = (&mut self.pod_list, PodView::of(&pod)) {
                        list.push(view);
                    }
                }
                Event::InitDone => {
                    self.ledger
                        .replace_pods(self.pod_list.take().unwrap_or_default());
                    self.pods_synced = true;
                }
                Event::Apply(pod) => {
                    if let Some((view, annotated)) = PodView::of(&pod) {
                        self.patch_failures.remove(&view.uid);
                        self.ledger.set_pod(view, annotated);
                    }
                }
                Event::Delete(pod) => {
                    if let Some(uid) = &pod.metadata.uid {
                        self.patch_failures.remove(uid);
                        self.ledger.remove_pod(uid);
                    }
                }
            },
        }
    }

    fn on_error(&mut self, e: &watcher::Error) {
        tracing::warn!(error = %e, "Kubernetes watch failed; retrying with backoff");
        self.failing_since.get_or_insert_with(Instant::now);
    }

    /// The API answered: no longer unreachable.
    fn api_answered(&mut self) {
        self.failing_since = None;
        if self.unreachable.take().is_some() {
            tracing::info!("Kubernetes API reachable again");
        }
    }

    /// Checks whether the API answers while the watches fail (a watch that resumed quietly
    /// shows no event).
    async fn probe(&mut self) {
        let answered =
            tokio::time::timeout(PROBE_INTERVAL * 2, self.client.apiserver_version()).await;
        if matches!(answered, Ok(Ok(_))) {
            self.api_answered();
        }
    }

    /// One pass of the ledger against the API's view and the mesh state.
    fn step(&mut self) -> Option<Change> {
        if !(self.ns_synced && self.pods_synced) {
            return None;
        }
        let proc_root = self.cfg.host_proc.clone();
        let lookup = move |uid: &str| super::procfs::find_netns(Path::new(&proc_root), uid);
        let change = self
            .store
            .read(|state| self.ledger.step(state, &lookup, Instant::now()));
        if change.is_none() && self.first_pass.take().is_some() {
            tracing::info!(
                waiting = self.ledger.pending(),
                "kubernetes: first enrollment pass done"
            );
        }
        change
    }

    /// Starts the annotation patches that are due.
    fn patch_annotations(&mut self) {
        for (pod, enabled) in self.ledger.annotations_to_fix() {
            if self.patching.contains(&pod.uid)
                || self.patch_failures.get(&pod.uid).copied().unwrap_or(0) >= PATCH_ATTEMPTS
            {
                continue;
            }
            self.patching.insert(pod.uid.clone());
            let api = Api::<KubePod>::namespaced(self.client.clone(), &pod.namespace);
            let value = enabled.then_some(REDIRECTION_ENABLED);
            let body = serde_json::json!({ "metadata": { "annotations": { REDIRECTION: value } } });
            self.patches.push(Box::pin(async move {
                let result = tokio::time::timeout(
                    CALL_TIMEOUT,
                    api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&body)),
                )
                .await;
                let outcome = match result {
                    Ok(Ok(_)) => {
                        tracing::info!(pod = %pod.label(), annotation = REDIRECTION, ?value, "pod annotated");
                        Ok(())
                    }
                    // Gone meanwhile: nothing to record.
                    Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(()),
                    Ok(Err(e)) => Err(format!("pod {}: {e}", pod.label())),
                    Err(_) => Err(format!("pod {}: no answer in {CALL_TIMEOUT:?}", pod.label())),
                };
                (pod.uid, enabled, outcome)
            }));
        }
    }

    fn on_patched(&mut self, (uid, enabled, outcome): Patched) {
        self.patching.remove(&uid);
        match outcome {
            Ok(()) => {
                self.patch_failures.remove(&uid);
                // Until the watch brings the pod back, so the patch is not sent again.
                self.ledger.set_annotated(&uid, enabled);
            }
            Err(e) => {
                let attempts = self.patch_failures.entry(uid).or_default();
                *attempts += 1;
                tracing::warn!(error = %e, attempt = *attempts, "annotating the pod failed");
            }
        }
    }

    /// Waits for anything that may change what to do; `false` when the watches ended.
    async fn wait(&mut self) -> bool {
        let retry = self.ledger.next_retry().map(tokio::time::Instant::from_std);
        let unready_at = match (self.failing_since, &self.unreachable) {
            (Some(since), None) => Some(tokio::time::Instant::from_std(
                since + self.cfg.unready_after,
            )),
            _ => None,
        };
        let probing = self.failing_since.is_some();
        tokio::select! {
            update = self.updates.next() => match update {
                None => return false,
                Some(Ok(update)) => self.on_update(update),
                Some(Err(e)) => self.on_error(&e),
            },
            changed = self.store_changes.changed() => {
                if changed.is_err() {
                    // The store is gone with the agent.
                    return false;
                }
            }
            Some(patched) = self.patches.next(), if !self.patches.is_empty() => self.on_patched(patched),
            _ = sleep_until(retry), if retry.is_some() => {}
            _ = sleep_until(unready_at), if unready_at.is_some() => {
                tracing::error!(after = ?self.cfg.unready_after, "Kubernetes API out of reach; the agent is not ready");
                self.unreachable = Some(self.readiness.block("kubernetes api out of reach"));
            }
            _ = tokio::time::sleep(PROBE_INTERVAL), if probing => self.probe().await,
        }
        true
    }

    /// This node's name, as the pod watch selects it.
    pub fn node(&self) -> &str {
        &self.node
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Source for KubeSource {
    /// Waits for the first lists of namespaces and pods; every enrollment, the first pass's
    /// included, then comes from [`Source::next`].
    fn initial(&mut self) -> BoxFuture<'_, Result<Vec<Pod>, SourceError>> {
        Box::pin(async move {
            while !(self.ns_synced && self.pods_synced) {
                if !self.wait().await {
                    return Err(error("the watches ended before the first lists"));
                }
            }
            tracing::info!(node = %self.node, "kubernetes: namespaces and this node's pods listed");
            Ok(Vec::new())
        })
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Change>> {
        Box::pin(async move {
            loop {
                if let Some(change) = self.step() {
                    return Some(change);
                }
                self.patch_annotations();
                if !self.wait().await {
                    return None;
                }
            }
        })
    }

    fn report(&mut self, outcome: Result<(), String>) {
        self.ledger.report(outcome, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube builds its TLS config from rustls' process-wide provider, which rustls cannot
    /// choose by itself now that two are compiled in (aws-lc-rs, and ring for HBONE records,
    /// see `tls::provider`); kube installs aws-lc-rs when none is set, with its `aws-lc-rs`
    /// feature. Were that to change, this would panic. Building the client sends nothing.
    #[tokio::test]
    async fn a_client_for_an_https_api_builds_with_two_tls_providers_compiled_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://198.18.0.1:6443'}}]\n\
             users: [{name: u, user: {token: t}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n",
        )
        .unwrap();
        let cfg = KubernetesConfig {
            kubeconfig: vec![path],
            ..KubernetesConfig::default()
        };
        client(&cfg).await.expect("client");
        assert!(
            rustls::crypto::CryptoProvider::get_default().is_some(),
            "kube took its TLS set-up path and left a process-wide provider"
        );
    }
}
