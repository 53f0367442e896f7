//! The endpoint controller's part, which the test's API server lacks (it runs no
//! controller-manager): an EndpointSlice per Service listing the pods it selects, as
//! `kube-controller-manager` writes it.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{json, Value};

use crate::kube::Kube;

/// The pods the test runs listen on this port, named so in Services.
pub const PORT_NAME: &str = "http";

impl Kube {
    /// Writes Service `namespace/service`'s EndpointSlice (`SERVICE-controller`): the
    /// pods matching `selector` that have an address, ready, with their node and port
    /// `http` as `port`, except the pods named in `left_out`.
    pub fn publish_endpoint_slice(
        &self,
        namespace: &str,
        service: &str,
        selector: &str,
        port: u16,
        left_out: &[&str],
    ) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client(), namespace);
        let pods = self
            .block_on(api.list(&ListParams::default().labels(selector)))
            .with_context(|| format!("listing the pods of {selector}"))?;
        let endpoints: Vec<Value> = pods
            .items
            .iter()
            .filter_map(|pod| {
                let name = pod.metadata.name.as_deref()?;
                let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
                (!left_out.contains(&name)).then(|| {
                    json!({
                        "addresses": [ip],
                        "conditions": { "ready": true, "serving": true, "terminating": false },
                        "nodeName": pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                        "targetRef": { "kind": "Pod", "namespace": namespace, "name": name,
                                       "uid": pod.metadata.uid },
                    })
                })
            })
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-controller"),
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": PORT_NAME, "port": port, "protocol": "TCP" }],
        });
        // JSON is YAML.
        self.apply(&slice.to_string(), namespace, false)?;
        Ok(())
    }
}
