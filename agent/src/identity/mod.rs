//! Workload identity: SPIFFE ids, which of them a node may hold, and the
//! agent's store of their certificates ([`Identities`]), kept issued and
//! renewed by the mesh CA ([`crate::ca`]).

mod client;
mod spiffe;
mod store;
#[cfg(test)]
mod store_tests;
pub mod x509;

use std::collections::BTreeSet;

pub use client::{CaClient, CaError};
pub use spiffe::{is_valid_segment, node_id, NodeId, PeerCertError, SpiffeId, SpiffeIdError};
pub use store::{
    CaStatus, CertState, CertStatus, CredentialError, Identities, IdentitiesSettings,
    NodeCredential,
};

use crate::config::Config;

/// The service account of the ingress gateway, in the root namespace.
pub const INGRESS_SERVICE_ACCOUNT: &str = "nodemesh-ingress";

/// What the ingress forwards into the mesh as:
/// `spiffe://<td>/ns/<root namespace>/sa/nodemesh-ingress`.
pub fn ingress_id(cfg: &Config, trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, cfg.root_namespace(), INGRESS_SERVICE_ACCOUNT)
}

/// `namespace/name` the ingress is known as (telemetry, `nodemesh connections`).
pub fn ingress_key(cfg: &Config) -> String {
    format!("{}/{INGRESS_SERVICE_ACCOUNT}", cfg.root_namespace())
}

/// Whether `cfg` has `node` serve any Gateway.
pub fn serves_ingress(cfg: &Config, node: &str) -> bool {
    let no_labels = Default::default();
    let labels = cfg.node(node).map_or(&no_labels, |n| &n.labels);
    let mut served = cfg.routing().ingress().served_by(labels);
    served.next().is_some()
}

/// Identities of the workloads that `cfg` places on `node` in enrolled
/// namespaces, and the ingress's when the node serves a Gateway. The CA
/// signs exactly these for `node`, and the node's agent asks for exactly
/// these: one function, so that the two never disagree.
pub fn on_node(cfg: &Config, node: &str, trust_domain: &str) -> BTreeSet<SpiffeId> {
    let ingress = serves_ingress(cfg, node).then(|| ingress_id(cfg, trust_domain));
    cfg.workloads()
        .iter()
        .filter(|w| w.node == node && cfg.is_enrolled(w))
        .filter(|w| is_valid_segment(&w.namespace) && is_valid_segment(&w.service_account))
        .map(|w| SpiffeId::new(trust_domain, &w.namespace, &w.service_account))
        .chain(ingress)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::TestDir;
    use crate::config::LoadOptions;

    /// Two enrolled workloads sharing a service account on node-a, one on
    /// node-b, and one in a namespace outside the mesh on node-a.
    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec: {serviceAccount: web, netns: /var/run/netns/w1, addresses: [10.1.0.2], node: node-a}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-2, namespace: shop}
spec: {serviceAccount: web, netns: /var/run/netns/w2, addresses: [10.1.0.3], node: node-a}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: shop}
spec: {serviceAccount: db, netns: /var/run/netns/db, addresses: [10.2.0.2], node: node-b}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: legacy, namespace: plain}
spec: {netns: /var/run/netns/l, addresses: [10.1.0.4], node: node-a}
"#;

    pub(crate) fn mesh_config() -> Config {
        let dir = TestDir::new();
        dir.write("mesh.yaml", MESH);
        Config::load_dir(dir.path(), &LoadOptions::default()).unwrap()
    }

    #[test]
    fn on_node_lists_enrolled_identities_of_that_node_only() {
        let cfg = mesh_config();
        let a: Vec<String> = on_node(&cfg, "node-a", "td")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(a, ["spiffe://td/ns/shop/sa/web"]);
        let b = on_node(&cfg, "node-b", "td");
        assert_eq!(
            b.into_iter().collect::<Vec<_>>(),
            [SpiffeId::new("td", "shop", "db")]
        );
        assert!(on_node(&cfg, "node-c", "td").is_empty());
    }
}
