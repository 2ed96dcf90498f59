//! The policies of the mesh, indexed by where they apply: a global list, one list per
//! namespace, and every policy by `namespace/name` for the workloads that name them. Finding
//! a destination's policies costs the size of its own lists, whatever else is stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::eval::{Connection, Decision, Reason, evaluate};
use super::{Policy, Scope};
use crate::state::State;
use crate::workload::Workload;

#[derive(Debug, Clone, Default)]
pub struct Policies {
    by_key: HashMap<String, Arc<Policy>>,
    /// Key → policy, ordered so evaluation (and its dry-run report) is deterministic.
    global: BTreeMap<String, Arc<Policy>>,
    by_namespace: HashMap<String, BTreeMap<String, Arc<Policy>>>,
}

impl Policies {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the policy with this `namespace/name`; returns the one replaced. The
    /// caller has validated it (or stores [`Policy::rejected`] instead).
    pub fn upsert(&mut self, policy: impl Into<Arc<Policy>>) -> Option<Arc<Policy>> {
        let policy = policy.into();
        let key = policy.key();
        let old = self.by_key.insert(key.clone(), policy.clone());
        if let Some(old) = &old {
            self.unindex(&key, old);
        }
        match policy.scope {
            Scope::Global => {
                self.global.insert(key, policy);
            }
            Scope::Namespace => {
                self.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key, policy);
            }
            // Found through the workloads that name them.
            Scope::WorkloadSelector => {}
        }
        old
    }

    /// Removes the policy with this `namespace/name`; returns it.
    pub fn remove(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.by_key.remove(key)?;
        self.unindex(key, &old);
        Some(old)
    }

    fn unindex(&mut self, key: &str, policy: &Policy) {
        match policy.scope {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => {
                if let Some(list) = self.by_namespace.get_mut(&policy.namespace) {
                    list.remove(key);
                    if list.is_empty() {
                        self.by_namespace.remove(&policy.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {}
        }
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// All policies, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values()
    }

    /// The policies that apply to `workload`: every global one, those of its namespace, and
    /// those it names (names not stored are skipped, as in Istio; a name that is global or of
    /// its own namespace is not counted twice).
    pub fn applying_to<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Policy> {
        let namespace = workload.namespace();
        let selected = workload
            .authorization_policies
            .iter()
            .filter_map(|key| self.by_key.get(key))
            .filter(move |p| match p.scope {
                Scope::Global => false,
                Scope::Namespace => p.namespace != namespace,
                Scope::WorkloadSelector => true,
            });
        self.global
            .values()
            .chain(
                self.by_namespace
                    .get(namespace)
                    .into_iter()
                    .flat_map(|l| l.values()),
            )
            .chain(selected)
            .map(|p| &**p)
    }

    /// Decides `conn` to `workload`.
    pub fn evaluate(&self, workload: &Workload, conn: &Connection) -> Decision {
        evaluate(self.applying_to(workload), conn)
    }
}

impl State {
    /// Decides `conn` to the workload with this uid, as the mesh is now; a workload that is
    /// gone is denied.
    pub fn authorize(&self, workload_uid: &str, conn: &Connection) -> Decision {
        match self.workload_by_uid(workload_uid) {
            Some(w) => self.policies().evaluate(&w, conn),
            None => Decision {
                reason: Reason::UnknownWorkload(workload_uid.to_owned()),
                dry_run: Vec::new(),
            },
        }
    }
}
