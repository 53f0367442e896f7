//! A large cluster in the test's API server, created quickly (many requests in
//! flight): Services, each with its pods on nodes that run no agent (given an
//! address as a kubelet would), an EndpointSlice listing them as the endpoint
//! controller would, and a VirtualService with one route to it.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context, Result};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};

use crate::kube::Kube;
use crate::kube_endpoints::PORT_NAME;
use crate::kube_mesh::APP_PORT;

/// Requests in flight at once.
const IN_FLIGHT: usize = 48;
/// Nodes the pods are spread over (none runs an agent).
const NODES: u32 = 10;

/// How many objects to create.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub services: u32,
    pub pods_per_service: u32,
}

impl Scale {
    /// The issue's cluster: 10 000 Services, 50 000 endpoints, 10 000 routes.
    pub const ISSUE: Scale = Scale {
        services: 10_000,
        pods_per_service: 5,
    };

    pub fn pods(&self) -> u32 {
        self.services * self.pods_per_service
    }
}

/// Pod `i`'s address: 10.200.0.1 onwards.
fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + i)
}

fn node_name(i: u32) -> String {
    format!("scale-node-{}", i % NODES)
}

impl Kube {
    /// Creates `scale`'s objects in `namespace` (Services `scale-N`, pods
    /// `scale-N-M`, their slices and VirtualServices) and Nodes `scale-node-*`.
    pub fn create_at_scale(&self, namespace: &str, scale: Scale) -> Result<()> {
        for n in 0..NODES {
            self.register_node(&node_name(n), Ipv4Addr::new(10, 250, 0, n as u8 + 1))?;
        }
        let services: Api<Service> = Api::namespaced(self.client(), namespace);
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client(), namespace);
        let routes = virtual_services(self, namespace);
        let create = PostParams::default();

        self.in_flight("Services", scale.services, |s| {
            let service = json!({
                "metadata": { "name": format!("scale-{s}") },
                "spec": {
                    "selector": { "app": format!("scale-{s}") },
                    "ports": [{ "name": "http", "port": APP_PORT, "targetPort": PORT_NAME }],
                },
            });
            let (services, create) = (&services, &create);
            async move {
                anyhow::Ok(
                    services
                        .create(create, &serde_json::from_value(service)?)
                        .await?,
                )
            }
        })?;

        let uids = self.in_flight("Pods", scale.pods(), |i| {
            let (s, m) = (i / scale.pods_per_service, i % scale.pods_per_service);
            let name = format!("scale-{s}-{m}");
            let pod = json!({
                "metadata": { "name": name, "labels": {
                    "app": format!("scale-{s}"), "version": format!("v{}", m % 2 + 1) } },
                "spec": {
                    "nodeName": node_name(i),
                    "serviceAccountName": format!("scale-{s}"),
                    "containers": [{ "name": "app", "image": "nodemesh.invalid/mesh-app" }],
                },
            });
            let status = json!({ "status": {
                "phase": "Running",
                "podIP": pod_ip(i).to_string(),
                "podIPs": [{ "ip": pod_ip(i).to_string() }],
            } });
            let (pods, create) = (&pods, &create);
            async move {
                let created = pods.create(create, &serde_json::from_value(pod)?).await?;
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(created.metadata.uid.unwrap_or_default())
            }
        })?;

        self.in_flight("EndpointSlices", scale.services, |s| {
            let endpoints: Vec<Value> = (0..scale.pods_per_service)
                .map(|m| {
                    let i = s * scale.pods_per_service + m;
                    json!({
                        "addresses": [pod_ip(i).to_string()],
                        "conditions": { "ready": true, "serving": true, "terminating": false },
                        "nodeName": node_name(i),
                        "targetRef": { "kind": "Pod", "namespace": namespace,
                                       "name": format!("scale-{s}-{m}"), "uid": uids[i as usize] },
                    })
                })
                .collect();
            let slice = json!({
                "metadata": { "name": format!("scale-{s}-controller"), "labels": {
                    "kubernetes.io/service-name": format!("scale-{s}"),
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                } },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{ "name": PORT_NAME, "port": APP_PORT, "protocol": "TCP" }],
            });
            let (slices, create) = (&slices, &create);
            async move {
                anyhow::Ok(
                    slices
                        .create(create, &serde_json::from_value(slice)?)
                        .await?,
                )
            }
        })?;

        self.in_flight("VirtualServices", scale.services, |s| {
            let host = format!("scale-{s}");
            let route = json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": { "name": host },
                "spec": {
                    "hosts": [host],
                    "http": [{
                        "match": [{ "uri": { "prefix": format!("/{s}/") } }],
                        "route": [{ "destination": { "host": host } }],
                    }],
                },
            });
            let (routes, create) = (&routes, &create);
            async move {
                anyhow::Ok(
                    routes
                        .create(create, &serde_json::from_value(route)?)
                        .await?,
                )
            }
        })?;
        Ok(())
    }

    /// Deletes the pods, slices and routes [`Kube::create_at_scale`] made in
    /// `namespace`, leaving its Services: an agent's tables shrink to them.
    /// Service by Service: one request for 50 000 pods outlasts the client.
    pub fn shrink_to_services(&self, namespace: &str, scale: Scale) -> Result<()> {
        // No kubelet confirms a pod's end: deleted at once.
        let now = DeleteParams::default().grace_period(0);
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client(), namespace);
        let routes = virtual_services(self, namespace);
        self.in_flight(
            "deletions of a Service's pods, slice and route",
            scale.services,
            |s| {
                let (pods, slices, routes, now) = (&pods, &slices, &routes, &now);
                async move {
                    let of_service = ListParams::default().labels(&format!("app=scale-{s}"));
                    pods.delete_collection(now, &of_service).await?;
                    slices.delete(&format!("scale-{s}-controller"), now).await?;
                    routes.delete(&format!("scale-{s}"), now).await?;
                    anyhow::Ok(())
                }
            },
        )?;
        Ok(())
    }

    /// Runs `request(0..n)` with [`IN_FLIGHT`] requests at a time; the results
    /// in order.
    fn in_flight<T, E, F>(&self, what: &str, n: u32, request: impl Fn(u32) -> F) -> Result<Vec<T>>
    where
        F: std::future::Future<Output = Result<T, E>>,
        E: Into<anyhow::Error>,
    {
        let start = Instant::now();
        let results = self
            .block_on(
                stream::iter(0..n)
                    .map(request)
                    .buffered(IN_FLIGHT)
                    .map_err(Into::into)
                    .try_collect::<Vec<T>>(),
            )
            .with_context(|| format!("creating {n} {what}"))?;
        let took = start.elapsed();
        eprintln!(
            "created {n} {what} in {took:.1?} ({:.0}/s)",
            f64::from(n) / took.as_secs_f64()
        );
        Ok(results)
    }
}

fn virtual_services(kube: &Kube, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    };
    Api::namespaced_with(kube.client(), namespace, &resource)
}
