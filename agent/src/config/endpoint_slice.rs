//! `discovery.k8s.io/v1` EndpointSlice: which addresses serve a Service, and on which
//! port numbers. A Service with at least one slice takes its endpoints from its slices'
//! ready addresses (the cluster's endpoint controller has decided them); one without any
//! (the usual case in the YAML mode) from its selector over the workloads.
//!
//! An address is an endpoint only as the workload that holds it: the workload brings the
//! identity and labels (subsets) that slices do not carry.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::load::{check_metadata, port_number, Issues};
use super::model::Metadata;
use super::{Protocol, Service};

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSliceDoc {
    metadata: Metadata,
    address_type: String,
    /// `null` when no endpoint is left.
    endpoints: Option<Vec<EndpointDoc>>,
    ports: Option<Vec<SlicePortDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointDoc {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
    node_name: Option<String>,
    /// Read but not used: an endpoint's locality is that of its pod's Node.
    zone: Option<String>,
    #[serde(rename = "hostname")]
    _hostname: Option<IgnoredAny>,
    #[serde(rename = "targetRef")]
    _target_ref: Option<IgnoredAny>,
    #[serde(rename = "hints")]
    _hints: Option<IgnoredAny>,
    #[serde(rename = "deprecatedTopology")]
    _deprecated_topology: Option<IgnoredAny>,
}

/// Kubernetes: an absent `ready` means ready; terminating endpoints are not ready.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conditions {
    ready: Option<bool>,
    #[serde(rename = "serving")]
    _serving: Option<bool>,
    #[serde(rename = "terminating")]
    _terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SlicePortDoc {
    name: Option<String>,
    port: Option<i64>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(rename = "appProtocol")]
    _app_protocol: Option<IgnoredAny>,
}

/// A validated slice.
pub struct EndpointSlice {
    /// `namespace/name` of its Service.
    service: (String, String),
    name: String,
    /// Addresses of the endpoints whose `ready` condition is not false.
    ready: Vec<IpAddr>,
    /// Port number by (port name, protocol); the name matches the Service port's.
    ports: Vec<(Option<String>, Protocol, u16)>,
}

pub fn endpoint_slice(doc: EndpointSliceDoc, issues: &mut Issues) -> EndpointSlice {
    check_metadata(&doc.metadata, issues);
    let labels = &doc.metadata.labels;
    let service = labels.get(SERVICE_NAME_LABEL).cloned().unwrap_or_else(|| {
        let message = format!("needs the label {SERVICE_NAME_LABEL} naming its Service");
        issues.add("metadata.labels", message);
        String::new()
    });
    let ipv6 = match doc.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            let message = format!("unsupported address type {other:?} (IPv4 or IPv6)");
            issues.add("addressType", message);
            false
        }
    };
    let mut ready = Vec::new();
    for (i, endpoint) in doc.endpoints.iter().flatten().enumerate() {
        if endpoint.node_name.as_deref() == Some("") || endpoint.zone.as_deref() == Some("") {
            issues.add(
                format!("endpoints[{i}]"),
                "nodeName and zone must not be empty",
            );
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv6() == ipv6 => {
                    if endpoint.conditions.ready != Some(false) {
                        ready.push(ip);
                    }
                }
                Ok(_) => issues.add(field, format!("not an {} address", doc.address_type)),
                Err(_) => issues.add(field, format!("{address:?} is not an IP address")),
            }
        }
    }
    let mut ports = Vec::new();
    for (i, port) in doc.ports.into_iter().flatten().enumerate() {
        let field = format!("ports[{i}].port");
        // No port number: "all ports" (a Service without ports); nothing to map.
        if let Some(number) = port.port.and_then(|n| port_number(n, field, issues)) {
            ports.push((port.name, port.protocol, number));
        }
    }
    EndpointSlice {
        service: (doc.metadata.namespace, service),
        name: doc.metadata.name,
        ready,
        ports,
    }
}

/// The slices of each Service, by `(namespace, name)`, in slice name order.
pub struct SlicesByService(HashMap<(String, String), Vec<EndpointSlice>>);

impl SlicesByService {
    pub fn new(slices: Vec<EndpointSlice>) -> SlicesByService {
        let mut by_service: HashMap<_, Vec<EndpointSlice>> = HashMap::new();
        for slice in slices {
            by_service
                .entry(slice.service.clone())
                .or_default()
                .push(slice);
        }
        for slices in by_service.values_mut() {
            slices.sort_by(|a, b| a.name.cmp(&b.name));
        }
        SlicesByService(by_service)
    }

    fn of(&self, service: &Service) -> Option<&[EndpointSlice]> {
        let key = (service.namespace.clone(), service.name.clone());
        self.0.get(&key).map(Vec::as_slice)
    }

    /// The workloads serving `service` by its slices (sorted, each once), or `None` if it
    /// has no slice.
    pub fn endpoints(
        &self,
        service: &Service,
        workload_by_address: &HashMap<IpAddr, usize>,
    ) -> Option<Vec<usize>> {
        let slices = self.of(service)?;
        let mut endpoints: Vec<usize> = slices
            .iter()
            .flat_map(|s| &s.ready)
            .filter_map(|ip| workload_by_address.get(ip).copied())
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        Some(endpoints)
    }

    /// Sets the target port of each of `service`'s ports named in its slices, as the
    /// endpoint controller resolved it (the first slice by name that has it).
    pub fn resolve_ports(&self, service: &mut Service) {
        let Some(slices) = self.of(service) else {
            return;
        };
        let resolved: HashMap<(Option<&str>, Protocol), u16> = slices
            .iter()
            .rev()
            .flat_map(|s| &s.ports)
            .map(|(name, protocol, port)| ((name.as_deref(), *protocol), *port))
            .collect();
        for port in &mut service.ports {
            if let Some(&number) = resolved.get(&(port.name.as_deref(), port.protocol)) {
                port.target_port = number;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::{Config, ConfigErrors, LoadOptions};

    /// Workloads `web-a` (10.0.0.1), `web-b` (10.0.0.2) and `web-c` (10.0.0.3), all
    /// selected by Service `web` (port 80 named http, target 8080), plus `extra`.
    const BASE: &str = "
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {netns: /run/netns/a, addresses: [10.0.0.1], node: node-1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec: {netns: /run/netns/b, addresses: [10.0.0.2], node: node-2}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-c, namespace: shop, labels: {app: web}}
spec: {netns: /run/netns/c, addresses: [10.0.0.3], node: node-2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 81}]
";

    fn load(slices: &str) -> Result<Config, ConfigErrors> {
        let files = [(PathBuf::from("shop.yaml"), format!("{BASE}{slices}"))];
        Config::load_documents(&files, &LoadOptions::default())
    }

    fn endpoints(config: &Config) -> Vec<String> {
        let web = config.service_by_key("shop/web").unwrap();
        config.endpoints(web).map(|w| w.name.clone()).collect()
    }

    #[test]
    fn without_slices_the_selector_decides() {
        let config = load("").unwrap();
        assert_eq!(endpoints(&config), ["web-a", "web-b", "web-c"]);
        let web = config.service_by_key("shop/web").unwrap();
        assert_eq!(web.ports[0].target_port, 8080);
    }

    #[test]
    fn slices_decide_the_endpoints_and_target_ports_by_port_name() {
        // As the endpoint controller writes them: web-c left out, web-b terminating,
        // an address of no workload, the http port resolved to 9080.
        let slices = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x1
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: test}
  generateName: web-
  ownerReferences: [{apiVersion: v1, kind: Service, name: web, uid: u}]
addressType: IPv4
endpoints:
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-2
  targetRef: {kind: Pod, name: web-b, namespace: shop}
- addresses: [10.0.0.1]
  conditions: {ready: true}
  nodeName: node-1
  zone: zone-a
- addresses: [10.9.9.9]
ports: [{name: http, port: 9080, protocol: TCP, appProtocol: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: null
ports: [{name: http, port: 7777}]
";
        let config = load(slices).unwrap();
        assert_eq!(endpoints(&config), ["web-a"]);
        let web = config.service_by_key("shop/web").unwrap();
        let targets: Vec<_> = web.ports.iter().map(|p| p.target_port).collect();
        assert_eq!(targets, [9080, 81], "the first slice by name wins");
    }

    #[test]
    fn a_named_target_port_takes_its_number_from_the_slices() {
        let named = "
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: grpc, port: 90, targetPort: grpc-port}]
";
        let errors = load(named).unwrap_err().to_string();
        assert!(
            errors.contains(
                "spec.ports[0].targetPort: named port \"grpc-port\" needs an EndpointSlice"
            ),
            "{errors}"
        );
        let slice = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.3]}]
ports: [{name: grpc, port: 5000}]
";
        let config = load(&format!("{named}{slice}")).unwrap();
        let api = config.service_by_key("shop/api").unwrap();
        assert_eq!(api.ports[0].target_port, 5000);
        let endpoints: Vec<_> = config.endpoints(api).map(|w| w.name.as_str()).collect();
        assert_eq!(endpoints, ["web-c"]);
        // Scaled to zero: the controller's slice has neither endpoints nor ports, and no
        // workload is selected. The Service stays one (its address, name and routes),
        // its port unresolved and unused.
        let scaled_to_zero = named.replace("{app: web}", "{app: api}")
            + "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: []
";
        for services in [
            scaled_to_zero.as_str(),
            &named.replace("{app: web}", "{app: api}"),
        ] {
            let config = load(services).unwrap();
            let api = config.service_by_key("shop/api").unwrap();
            assert_eq!(config.endpoints(api).count(), 0, "{services}");
        }
    }

    #[test]
    fn a_service_whose_slices_are_empty_has_no_endpoint() {
        let empty = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
";
        assert!(endpoints(&load(empty).unwrap()).is_empty());
    }

    #[test]
    fn invalid_slices_are_rejected_with_the_field_named() {
        let bad = "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop}
addressType: IPv6
endpoints: [{addresses: [10.0.0.1, nonsense]}]
ports: [{name: http, port: 70000}]
";
        let errors: Vec<_> = load(bad)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect();
        for part in [
            "metadata.labels: needs the label kubernetes.io/service-name",
            "endpoints[0].addresses[0]: not an IPv6 address",
            "endpoints[0].addresses[1]: \"nonsense\" is not an IP address",
            "ports[0].port: must be between 1 and 65535",
        ] {
            assert!(
                errors.iter().any(|e| e.contains(part)),
                "{part}: {errors:#?}"
            );
        }
        let fqdn = bad.replace("IPv6", "FQDN");
        let errors = load(&fqdn).unwrap_err().to_string();
        assert!(
            errors.contains("unsupported address type \"FQDN\""),
            "{errors}"
        );
    }
}
