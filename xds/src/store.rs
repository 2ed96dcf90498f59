//! The shared handle on the mesh [`State`]: cloned into every task that
//! reads it, written by the sources that feed it.
//!
//! Access goes through closures so a lock guard can never be held across an
//! `.await`; critical sections are look-ups or single upserts. A whole new
//! state (a reloaded mesh file) is built outside the lock and swapped in.
//! Every write bumps a generation that [`Store::subscribe`] watches, so the
//! proxy can re-check what it decided from the old state.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::service::Service;
use crate::state::{Destination, State};
use crate::workload::Workload;

/// Cheap to clone; all clones see the same state.
#[derive(Clone)]
pub struct Store {
    state: Arc<RwLock<State>>,
    /// Count of writes so far.
    generation: Arc<watch::Sender<u64>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(State::default())
    }
}

impl Store {
    pub fn new(state: State) -> Self {
        Self {
            state: Arc::new(RwLock::new(state)),
            generation: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Changes whenever the state was written; a slow receiver sees only the latest value,
    /// so bursts of writes coalesce.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Runs `f` with the state read-locked. Keep `f` short: writers wait.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        // A writer that panicked left the indexes as its last completed step
        // did; serving them beats taking every reader down with it.
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        f(&state)
    }

    /// Runs `f` with the state write-locked, e.g. to apply one xDS update,
    /// then notifies subscribers.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            f(&mut state)
        };
        // After the lock is released: a woken receiver reads the new state.
        self.generation.send_modify(|g| *g += 1);
        result
    }

    /// Swaps in a whole new state; returns the old one, so it is dropped
    /// outside the lock.
    pub fn replace(&self, state: State) -> State {
        self.update(|current| std::mem::replace(current, state))
    }

    /// See [`State::resolve`].
    pub fn resolve(&self, network: &str, dst: SocketAddr) -> Destination {
        self.read(|s| s.resolve(network, dst))
    }

    /// See [`State::workload_by_ip`].
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.read(|s| s.workload_by_ip(network, ip))
    }

    /// See [`State::workload_by_uid`].
    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.read(|s| s.workload_by_uid(uid))
    }

    /// See [`State::workloads_on_node`].
    pub fn workloads_on_node(&self, node: &str) -> Vec<Arc<Workload>> {
        self.read(|s| s.workloads_on_node(node))
    }

    /// See [`State::service_by_vip`].
    pub fn service_by_vip(&self, network: &str, vip: SocketAddr) -> Option<Arc<Service>> {
        self.read(|s| s.service_by_vip(network, vip))
    }
}

impl crate::client::Client {
    /// Feeds `store` with both resource types an agent watches, `istio.workload.Address` then
    /// `istio.security.Authorization` (ztunnel's order). Equivalent to:
    ///
    /// ```no_run
    /// use xds::client::{Client, Config};
    /// use xds::proto::istio::{security::Authorization, workload::Address};
    /// use xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
    ///
    /// fn client(cfg: Config, store: &xds::Store) -> Client {
    ///     Client::new(cfg)
    ///         .watch::<Address, _>(ADDRESS_TYPE_URL, store.clone())
    ///         .watch::<Authorization, _>(AUTHORIZATION_TYPE_URL, store.clone())
    /// }
    /// ```
    pub fn watch_store(self, store: &Store) -> Self {
        use crate::proto::istio::{security::Authorization, workload::Address};
        use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
        self.watch::<Address, _>(ADDRESS_TYPE_URL, store.clone())
            .watch::<Authorization, _>(AUTHORIZATION_TYPE_URL, store.clone())
    }
}

impl From<State> for Store {
    fn from(state: State) -> Self {
        Self::new(state)
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.read(|s| {
            f.debug_struct("Store")
                .field("workloads", &s.workloads().count())
                .field("services", &s.services().count())
                .field("policies", &s.policies().len())
                .finish()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use identity::Identity;

    fn workload(uid: &str, ip: [u8; 4]) -> Workload {
        let mut w = Workload::new(uid, uid, Identity::with_defaults("", "demo", "").unwrap());
        w.addresses = vec![IpAddr::from(ip)];
        w
    }

    #[test]
    fn clones_share_updates_and_replace_swaps_everything() {
        let store = Store::default();
        let reader = store.clone();
        store.update(|s| s.upsert_workload(workload("demo/a", [127, 0, 0, 2])));
        let ip = IpAddr::from([127, 0, 0, 2]);
        assert_eq!(reader.workload_by_ip("", ip).unwrap().uid, "demo/a");

        let mut next = State::new();
        next.upsert_workload(workload("demo/b", [127, 0, 0, 3]));
        let old = store.replace(next);
        assert!(old.workload_by_uid("demo/a").is_some());
        assert!(reader.workload_by_uid("demo/a").is_none());
        assert!(reader.workload_by_ip("", ip).is_none());
        assert!(reader.workload_by_uid("demo/b").is_some());
    }

    #[test]
    fn every_write_is_announced_to_subscribers() {
        let store = Store::default();
        let mut rx = store.subscribe();
        assert!(!rx.has_changed().unwrap());
        store.update(|s| s.upsert_workload(workload("demo/a", [127, 0, 0, 2])));
        assert!(rx.has_changed().unwrap());
        let first = *rx.borrow_and_update();
        store.replace(State::new());
        assert!(rx.has_changed().unwrap());
        assert!(*rx.borrow_and_update() > first);
    }

    #[test]
    fn a_panicking_writer_does_not_take_readers_down() {
        let store = Store::default();
        let writer = store.clone();
        let result = std::thread::spawn(move || {
            writer.update(|s| {
                s.upsert_workload(workload("demo/a", [127, 0, 0, 2]));
                panic!("writer fails after its upsert");
            })
        })
        .join();
        assert!(result.is_err());
        assert!(store.workload_by_uid("demo/a").is_some());
    }
}
