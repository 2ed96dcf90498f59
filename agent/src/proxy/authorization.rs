//! Authorization of inbound connections: every one is decided against the mesh's policies
//! before its upstream connection is opened, and tracked while it lives so a policy change
//! that now denies it closes it.
//!
//! The decision itself is `xds::policy` (pure); this module logs what dry-run policies would
//! have done, keeps the [`Registry`] of live inbound connections, and re-checks them
//! ([`recheck_on_change`]) whenever the [`xds::Store`] announces a write. A connection is
//! registered before its first check, so a change landing between the check and the
//! registration cannot be missed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use xds::Workload;
use xds::policy::{Connection, Decision, Reason};

/// Every live inbound connection, by id.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// Kept small: there is one per open inbound connection (a `watch` channel here cost ~350 B
/// per connection; a once-cell and a waker slot ~50 B). The workload and the peer's principal
/// are shared, not copied.
struct Entry {
    /// Where the entry is listed (here rather than in [`Tracked`], which lives in the
    /// connection's task: the allocation has the room).
    registry: Weak<Registry>,
    workload: Arc<Workload>,
    conn: Connection,
    /// Set once, with the reason, when a re-check denies the connection.
    revoked: OnceLock<Arc<str>>,
    /// The connection's task, woken when `revoked` is set. One task polls each connection, so
    /// one waker slot is enough, and waiting needs no future of its own in that task.
    wake: AtomicWaker,
}

/// One connection's place in the [`Registry`]; dropping it forgets the connection.
pub struct Tracked {
    id: u64,
    entry: Arc<Entry>,
}

impl Registry {
    /// Registers a connection to the local workload `workload`.
    pub fn track(self: &Arc<Self>, workload: &Arc<Workload>, conn: Connection) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            registry: Arc::downgrade(self),
            workload: workload.clone(),
            conn,
            revoked: OnceLock::new(),
            wake: AtomicWaker::new(),
        });
        self.lock().insert(id, entry.clone());
        Tracked { id, entry }
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every live connection again against `store` as it is now, and revokes those
    /// now denied (their tasks close them). Returns how many were revoked.
    pub fn recheck(&self, store: &xds::Store) -> usize {
        // Decide outside the registry lock, one state read per connection, so neither new
        // connections nor state writers wait for the whole sweep.
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let mut revoked = 0;
        for entry in entries {
            if entry.revoked.get().is_some() {
                continue;
            }
            let workload = entry.workload.uid.as_str();
            let decision = store.read(|s| s.authorize(workload, &entry.conn));
            log_dry_run(workload, &entry.conn, &decision);
            if !decision.is_allowed() {
                let why: Arc<str> = decision.reason.to_string().into();
                tracing::warn!(
                    workload = %workload, src = %entry.conn.src, dst = %entry.conn.dst,
                    peer_identity = %peer(&entry.conn), reason = %why,
                    "open connection now denied by policy; closing it"
                );
                if entry.revoked.set(why).is_ok() {
                    entry.wake.wake();
                    revoked += 1;
                }
            }
        }
        revoked
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // The map stays consistent across a panic: every critical section is one call.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tracked {
    /// Ready, with the reason, once a policy change denied this connection.
    pub fn poll_revoked(&mut self, cx: &mut Context<'_>) -> Poll<Arc<str>> {
        // Registered before looking, so a revocation between the look and the return still
        // wakes this task.
        self.entry.wake.register(cx.waker());
        match self.entry.revoked.get() {
            Some(why) => Poll::Ready(why.clone()),
            None => Poll::Pending,
        }
    }

    /// Resolves, with the reason, once a policy change denies this connection.
    pub async fn revoked(&mut self) -> Arc<str> {
        std::future::poll_fn(|cx| self.poll_revoked(cx)).await
    }

    /// Polls `copy` while the connection stays allowed: its output, or the reason once a
    /// policy change denied the connection (the caller then resets it).
    ///
    /// A poll step rather than a `select!` with [`Tracked::revoked`]: a connection's task polls
    /// it from its own hand-written future, which lives as long as the connection and holds
    /// nothing for the wait but the waker slot in the policy entry.
    pub fn poll_unless_revoked<F: Future + Unpin>(
        &mut self,
        copy: &mut F,
        cx: &mut Context<'_>,
    ) -> Poll<Result<F::Output, Arc<str>>> {
        if let Poll::Ready(why) = self.poll_revoked(cx) {
            return Poll::Ready(Err(why));
        }
        Pin::new(copy).poll(cx).map(Ok)
    }

    /// The local workload the connection goes to.
    pub fn workload(&self) -> &Arc<Workload> {
        &self.entry.workload
    }

    /// The connection as it was decided (and is re-checked).
    pub fn connection(&self) -> &Connection {
        &self.entry.conn
    }

    /// Whether a re-check has denied this connection.
    pub fn is_revoked(&self) -> bool {
        self.entry.revoked.get().is_some()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(registry) = self.entry.registry.upgrade() {
            super::forget(&mut registry.lock(), &self.id);
        }
    }
}

/// Decides `conn` to the local workload `workload` (its uid) as the mesh is now; logs what
/// dry-run policies would have done.
pub fn authorize(store: &xds::Store, workload: &str, conn: &Connection) -> Decision {
    let decision = store.read(|s| s.authorize(workload, conn));
    log_dry_run(workload, conn, &decision);
    decision
}

fn log_dry_run(workload: &str, conn: &Connection, decision: &Decision) {
    for dry in &decision.dry_run {
        tracing::info!(
            workload = %workload, src = %conn.src, dst = %conn.dst, peer_identity = %peer(conn),
            enforced = %if decision.is_allowed() { "allow" } else { "deny" },
            "{dry}"
        );
    }
}

fn peer(conn: &Connection) -> String {
    conn.peer
        .as_ref()
        .map_or_else(|| "-".to_owned(), |p| p.identity().to_string())
}

/// Why an inbound connection was refused by policy.
#[derive(Debug, thiserror::Error)]
#[error("denied by authorization policy: {0}")]
pub struct Denied(pub Reason);

/// Decides and tracks a new inbound connection to the local `workload`: the guard while it
/// is allowed.
pub fn admit(
    registry: &Arc<Registry>,
    store: &xds::Store,
    workload: &Arc<Workload>,
    conn: Connection,
) -> Result<Tracked, Denied> {
    let tracked = registry.track(workload, conn.clone());
    let decision = authorize(store, &workload.uid, &conn);
    if decision.is_allowed() {
        Ok(tracked)
    } else {
        Err(Denied(decision.reason))
    }
}

/// Re-checks every live inbound connection each time `store` announces a write, until the
/// store is dropped. Writes that come faster than a sweep coalesce into one.
/// Subscribes at once (not when first polled), so no write after this call is missed.
pub fn recheck_on_change(
    registry: Arc<Registry>,
    store: xds::Store,
) -> impl Future<Output = ()> + Send + 'static {
    let mut changes = store.subscribe();
    async move {
        while changes.changed().await.is_ok() {
            changes.mark_unchanged();
            let live = registry.len();
            let revoked = registry.recheck(&store);
            tracing::debug!(
                live,
                revoked,
                "inbound connections re-checked after a mesh change"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use identity::Identity;
    use xds::State;
    use xds::policy::{Action, Peer, Policy, Rule, Scope};

    fn echo() -> Arc<Workload> {
        let id = Identity::new("cluster.local", "demo", "echo").unwrap();
        Arc::new(Workload::new("demo/echo", "echo", id))
    }

    fn store() -> xds::Store {
        let mut state = State::new();
        state.upsert_workload(Workload::clone(&echo()));
        xds::Store::new(state)
    }

    fn conn(sa: &str) -> Connection {
        Connection {
            src: "198.18.0.2:40000".parse().unwrap(),
            dst: "198.18.1.3:8080".parse().unwrap(),
            peer: Some(Arc::new(Peer::new(
                Identity::new("cluster.local", "demo", sa).unwrap(),
            ))),
        }
    }

    fn deny(sa: &str) -> Policy {
        let mut p = Policy::new("demo", format!("deny-{sa}"), Scope::Namespace, Action::Deny);
        p.rules.push(Rule {
            clauses: vec![xds::policy::Clause {
                matches: vec![xds::policy::Match {
                    service_accounts: vec![xds::policy::ServiceAccountMatch {
                        namespace: "demo".into(),
                        service_account: sa.into(),
                    }],
                    ..Default::default()
                }],
            }],
        });
        p
    }

    #[tokio::test]
    async fn a_change_revokes_exactly_the_connections_it_now_denies() {
        let store = store();
        let registry = Arc::new(Registry::default());
        let echo = echo();
        let task = tokio::spawn(recheck_on_change(registry.clone(), store.clone()));
        let mut a = admit(&registry, &store, &echo, conn("a")).unwrap();
        let mut b = admit(&registry, &store, &echo, conn("b")).unwrap();
        assert_eq!(registry.len(), 2);

        store.update(|s| s.policies_mut().upsert(deny("a")));
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), a.revoked())
            .await
            .expect("a is revoked");
        assert!(why.contains("DENY policy demo/deny-a matched"), "{why}");
        // b is still allowed: a further sweep leaves it alone.
        assert_eq!(registry.recheck(&store), 0);
        assert!(!b.is_revoked());
        // New connections of a are refused up front, and not left in the registry.
        let Err(Denied(reason)) = admit(&registry, &store, &echo, conn("a")) else {
            panic!("a must be denied");
        };
        assert!(matches!(reason, Reason::Denied { .. }), "{reason:?}");
        assert_eq!(registry.len(), 2);
        drop(a);
        assert_eq!(registry.len(), 1);
        // The workload leaving the mesh denies what is open to it.
        store.update(|s| s.remove_workload("demo/echo"));
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), b.revoked())
            .await
            .expect("b is revoked");
        assert!(why.contains("not in the mesh"), "{why}");
        drop(b);
        assert!(registry.is_empty());
        task.abort();
    }
}
