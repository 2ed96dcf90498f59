//! Static enrollment from the mesh state: every workload whose `node` is this node is
//! enrolled, in the namespace its `netns` names (local mode's mesh file). When the state
//! changes (the mesh file reloaded), the difference to what was reported becomes changes: a workload gone
//! from this node is un-enrolled, a new one enrolled, one whose netns changed is both.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use tokio::sync::watch;

use super::{BoxFuture, Change, Pod, Source, SourceError};

pub struct MeshSource {
    store: xds::Store,
    node: String,
    /// Told of every write to `store`.
    changes: watch::Receiver<u64>,
    known: BTreeMap<String, Option<PathBuf>>,
    pending: VecDeque<Change>,
}

impl MeshSource {
    pub fn new(store: xds::Store, node: String) -> Self {
        MeshSource {
            changes: store.subscribe(),
            store,
            node,
            known: BTreeMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn current(&self) -> BTreeMap<String, Option<PathBuf>> {
        self.store
            .workloads_on_node(&self.node)
            .into_iter()
            .map(|w| (w.uid.clone(), w.netns.clone()))
            .collect()
    }
}

/// The changes that turn `known` into `current`: un-enrollments first, so a pod that moved
/// to another namespace releases the old one before enrolling in the new.
pub fn diff(
    known: &BTreeMap<String, Option<PathBuf>>,
    current: &BTreeMap<String, Option<PathBuf>>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (uid, netns) in known {
        if current.get(uid) != Some(netns) {
            changes.push(Change::Unenrolled { uid: uid.clone() });
        }
    }
    for (uid, netns) in current {
        if known.get(uid) != Some(netns) {
            changes.push(Change::Enrolled(Pod {
                uid: uid.clone(),
                netns: netns.clone(),
            }));
        }
    }
    changes
}

impl Source for MeshSource {
    fn initial(&mut self) -> BoxFuture<'_, Result<Vec<Pod>, SourceError>> {
        Box::pin(async move {
            self.changes.mark_unchanged();
            self.known = self.current();
            Ok(self
                .known
                .iter()
                .map(|(uid, netns)| Pod {
                    uid: uid.clone(),
                    netns: netns.clone(),
                })
                .collect())
        })
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Change>> {
        Box::pin(async move {
            loop {
                if let Some(change) = self.pending.pop_front() {
                    return Some(change);
                }
                self.changes.changed().await.ok()?;
                let current = self.current();
                self.pending.extend(diff(&self.known, &current));
                self.known = current;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;

    fn map(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<PathBuf>> {
        entries
            .iter()
            .map(|(u, n)| (u.to_string(), n.map(PathBuf::from)))
            .collect()
    }

    #[test]
    fn diff_unenrolls_first_and_reenrolls_a_moved_pod() {
        let known = map(&[("a", Some("/n/a")), ("b", Some("/n/b")), ("c", None)]);
        let current = map(&[("a", Some("/n/a")), ("b", Some("/n/b2")), ("d", None)]);
        assert_eq!(
            diff(&known, &current),
            vec![
                Change::Unenrolled { uid: "b".into() },
                Change::Unenrolled { uid: "c".into() },
                Change::Enrolled(Pod {
                    uid: "b".into(),
                    netns: Some("/n/b2".into())
                }),
                Change::Enrolled(Pod {
                    uid: "d".into(),
                    netns: None
                }),
            ]
        );
        assert!(diff(&current, &current).is_empty());
    }

    fn workload(name: &str, node: &str, netns: Option<&str>) -> Arc<xds::Workload> {
        let id = identity::Identity::new("cluster.local", "demo", name).unwrap();
        let mut w = xds::Workload::new(format!("demo/{name}"), name, id);
        w.node = node.into();
        w.addresses = vec!["198.19.1.1".parse::<IpAddr>().unwrap()];
        w.netns = netns.map(PathBuf::from);
        Arc::new(w)
    }

    #[tokio::test]
    async fn reload_reports_what_changed_on_this_node_only() {
        let mut state = xds::State::new();
        state.upsert_workload(workload("a", "n1", Some("/n/a")));
        state.upsert_workload(workload("x", "n2", Some("/n/x")));
        let store = xds::Store::new(state);
        let mut source = MeshSource::new(store.clone(), "n1".into());
        assert_eq!(
            source.initial().await.unwrap(),
            vec![Pod {
                uid: "demo/a".into(),
                netns: Some("/n/a".into())
            }]
        );
        let mut next = xds::State::new();
        next.upsert_workload(workload("b", "n1", None));
        next.upsert_workload(workload("x", "n2", Some("/n/x2")));
        // Replacing the state is the notice.
        store.replace(next);
        assert_eq!(
            source.next().await,
            Some(Change::Unenrolled {
                uid: "demo/a".into()
            })
        );
        assert_eq!(
            source.next().await,
            Some(Change::Enrolled(Pod {
                uid: "demo/b".into(),
                netns: None
            }))
        );
    }
}
