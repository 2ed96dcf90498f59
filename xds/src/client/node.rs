//! Who this agent tells the control plane it is: the `Node` of the first
//! request per type, in the form istiod expects from a node proxy
//! (wire.md §2.4 and §4).

use std::collections::BTreeMap;

use prost_types::{Struct, Value, value::Kind};

use crate::proto::envoy::config::core::v3 as core;

/// The agent's own pod and node, as the downward API gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`; must be the namespace of the bearer token's identity.
    pub pod_namespace: String,
    /// `INSTANCE_IP`.
    pub instance_ip: String,
    /// `NODE_NAME`: the Kubernetes node.
    pub node_name: String,
    /// `CLUSTER_ID`, sent as metadata `CLUSTER_ID`.
    pub cluster_id: String,
    /// `CLUSTER_DOMAIN`, default `cluster.local`.
    pub cluster_domain: String,
    /// Further metadata (Istio's `ISTIO_META_<X>`), as strings.
    pub extra_metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`: the `ztunnel`
    /// type makes istiod serve this client as a node proxy.
    pub fn id(&self) -> String {
        format!(
            "ztunnel~{}~{}.{}~{}.svc.{}",
            self.instance_ip,
            self.pod_name,
            self.pod_namespace,
            self.pod_namespace,
            self.cluster_domain
        )
    }

    pub(crate) fn to_proto(&self) -> core::Node {
        let mut fields: BTreeMap<String, Value> = self
            .extra_metadata
            .iter()
            .map(|(k, v)| (k.clone(), string(v)))
            .collect();
        for (key, value) in [
            ("NAME", &self.pod_name),
            ("NAMESPACE", &self.pod_namespace),
            ("INSTANCE_IPS", &self.instance_ip),
            ("NODE_NAME", &self.node_name),
            ("CLUSTER_ID", &self.cluster_id),
        ] {
            fields.insert(key.to_owned(), string(value));
        }
        core::Node {
            id: self.id(),
            cluster: String::new(),
            metadata: Some(Struct { fields }),
        }
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_and_metadata_are_what_istiod_expects_of_a_node_proxy() {
        let info = NodeInfo {
            pod_name: "ambientd-x1".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "198.18.0.7".into(),
            node_name: "node-1".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
            extra_metadata: BTreeMap::from([("NETWORK".into(), "net-a".into())]),
        };
        let node = info.to_proto();
        assert_eq!(
            node.id,
            "ztunnel~198.18.0.7~ambientd-x1.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(node.id.split('~').count(), 4);
        let meta = node.metadata.unwrap().fields;
        let get = |k: &str| match &meta[k].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{k} is {other:?}"),
        };
        assert_eq!(get("NAME"), "ambientd-x1");
        assert_eq!(get("NAMESPACE"), "istio-system");
        assert_eq!(get("INSTANCE_IPS"), "198.18.0.7");
        assert_eq!(get("NODE_NAME"), "node-1");
        assert_eq!(get("CLUSTER_ID"), "Kubernetes");
        assert_eq!(get("NETWORK"), "net-a");
        assert_eq!(meta.len(), 6);
    }
}
