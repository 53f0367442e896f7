//! What the Kubernetes source holds per object of a large cluster: heap bytes of the
//! watch stores and of the snapshot built from them, counted by the unit tests'
//! allocator (`crate::counting`, per thread) for objects written as the API server
//! sends them. The figures are printed, run with `--nocapture`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::config::{ConfigStore, LoadOptions};
use crate::counting::live_bytes;

use super::kinds::{Kind, WATCHED};
use super::object::Object;
use super::pod_summary::{self, PodSummary};
use super::snapshot::{NetnsHealth, Snapshots};
use super::status::Status;

const NODE: &str = "node-a";
const PODS_PER_SERVICE: u32 = 5;

/// Bounds on the bytes held per object, about 25 % above what is measured (20 KB per
/// Service with its slice, route and pods: 200 MB of heap for the 10 000).
const SERVICE_BOUND: isize = 2_600;
const SLICE_BOUND: isize = 3_100;
const ROUTE_BOUND: isize = 1_900;
const POD_BOUND: isize = 1_550;
const SNAPSHOT_BOUND: isize = 10_000;

/// What every object carries from the API server and the agent never reads.
fn metadata(name: &str, labels: Value) -> Value {
    json!({
        "name": name, "namespace": "scale", "uid": format!("0f1e2d3c-{name}"),
        "resourceVersion": "123456", "generation": 1,
        "creationTimestamp": "2026-12-02T16:00:00Z", "labels": labels,
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\"}"},
        "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                           "time": "2026-12-02T16:00:00Z", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:spec": {"f:ports": {}, "f:selector": {}}}}],
    })
}

fn service(s: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(&format!("svc-{s}"), json!({"app": format!("svc-{s}")})),
        "spec": {
            "type": "ClusterIP", "clusterIP": format!("10.96.{}.{}", s / 250, s % 250 + 1),
            "clusterIPs": [format!("10.96.{}.{}", s / 250, s % 250 + 1)],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": format!("svc-{s}")},
            "ports": [{"name": "http", "port": 9080, "targetPort": "http", "protocol": "TCP"}],
        },
        "status": {"loadBalancer": {}},
    })
}

fn pod_ip(s: u32, m: u32) -> String {
    let i = s * PODS_PER_SERVICE + m;
    format!("10.{}.{}.{}", 200 + i / 62_500, i / 250 % 250, i % 250 + 1)
}

fn other_node(i: u32) -> String {
    format!("node-{}", i % 10 + 1)
}

fn slice(s: u32) -> Value {
    let endpoints: Vec<Value> = (0..PODS_PER_SERVICE)
        .map(|m| {
            json!({
                "addresses": [pod_ip(s, m)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": other_node(m), "zone": "zone-1",
                "targetRef": {"kind": "Pod", "namespace": "scale", "name": format!("svc-{s}-{m}"),
                              "uid": format!("0f1e2d3c-svc-{s}-{m}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": metadata(&format!("svc-{s}-abcde"), json!({
            "kubernetes.io/service-name": format!("svc-{s}"),
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})),
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
    })
}

fn route(s: u32) -> Value {
    let host = format!("svc-{s}");
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": metadata(&host, json!({})),
        "spec": {"hosts": [host], "http": [{
            "match": [{"uri": {"prefix": format!("/{s}/")}}],
            "route": [{"destination": {"host": host}}],
        }]},
    })
}

fn pod(s: u32, m: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": metadata(&format!("svc-{s}-{m}"),
                             json!({"app": format!("svc-{s}"), "version": format!("v{}", m % 2 + 1)})),
        "spec": {
            "nodeName": other_node(m), "serviceAccountName": format!("svc-{s}"),
            "containers": [{"name": "app", "image": "example.invalid/app",
                            "ports": [{"containerPort": 9080, "name": "http"}]}],
            "volumes": [{"name": "token", "projected": {"sources": []}}],
        },
        "status": {
            "phase": "Running", "podIP": pod_ip(s, m), "podIPs": [{"ip": pod_ip(s, m)}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

/// Object `s` of a kind, as the API server sends it.
type Synthetic = fn(u32) -> Value;

/// `value` as the watch stream parses it: from JSON text.
fn parsed<K: DeserializeOwned>(value: &Value) -> K {
    serde_json::from_str(&value.to_string()).unwrap()
}

fn kind(name: &str) -> &'static Kind {
    WATCHED.iter().find(|k| k.kind == name).unwrap()
}

/// The watch stores of a cluster of `services`, and the bytes each kind's store holds.
struct Watched {
    stores: Vec<(&'static Kind, Writer<Object>)>,
    pods: Writer<PodSummary>,
    held: HashMap<&'static str, isize>,
}

fn watch(services: u32) -> Watched {
    let mut held = HashMap::new();
    let mut stores = Vec::new();
    let objects: [(&str, Synthetic); 3] = [
        ("Service", service),
        ("EndpointSlice", slice),
        ("VirtualService", route),
    ];
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "scale", "labels": {"nodemesh.io/mesh": "enabled"}}});
    let mut writer = Writer::new(kind("Namespace").api_resource());
    writer.apply_watcher_event(&watcher::Event::Apply(parsed(&namespace)));
    stores.push((kind("Namespace"), writer));
    for (name, object) in objects {
        let kind = kind(name);
        let before = live_bytes();
        let mut writer = Writer::new(kind.api_resource());
        for s in 0..services {
            let mut object: Object = parsed(&object(s));
            kind.strip(&mut object);
            writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        held.insert(name, live_bytes() - before);
        stores.push((kind, writer));
    }
    let before = live_bytes();
    let mut pods = Writer::default();
    for s in 0..services {
        for m in 0..PODS_PER_SERVICE {
            let mut pod: PodSummary = parsed(&pod(s, m));
            pod_summary::strip_remote(&mut pod);
            pods.apply_watcher_event(&watcher::Event::Apply(pod));
        }
    }
    held.insert("Pod", live_bytes() - before);
    Watched { stores, pods, held }
}

/// Bytes held by the stores per kind and by the loaded snapshot, at `services`.
fn held_at(services: u32) -> HashMap<&'static str, isize> {
    let store = ConfigStore::unloaded();
    let watched = watch(services);
    let mut snapshots = Snapshots {
        stores: watched
            .stores
            .iter()
            .map(|(kind, writer)| (*kind, writer.as_reader()))
            .collect(),
        local_pods: None,
        pods: watched.pods.as_reader(),
        opts: LoadOptions::default(),
        node: Some(NODE.to_owned()),
        status: Arc::new(Status::new(String::new(), std::iter::empty())),
        netns: Arc::new(NetnsHealth::default()),
        events: None,
        reported: HashSet::new(),
        statuses: None,
        last_valid: HashMap::new(),
        port_failures: None,
    };
    let before = live_bytes();
    snapshots.load(&store);
    let config = store.current();
    assert_eq!(config.services().len(), services as usize);
    assert_eq!(
        config.workloads().len(),
        (services * PODS_PER_SERVICE) as usize
    );
    assert_eq!(config.routing().route_count(), services as usize);
    let mut held = watched.held;
    held.insert("snapshot", live_bytes() - before);
    held
}

#[test]
fn bytes_held_per_object_of_a_large_cluster() {
    let (small, large) = (200, 2_000);
    let (at_small, at_large) = (held_at(small), held_at(large));
    let per = |what: &str| (at_large[what] - at_small[what]) / (large - small) as isize;
    let pods = per("Pod") / PODS_PER_SERVICE as isize;
    let (services, slices, routes) = (per("Service"), per("EndpointSlice"), per("VirtualService"));
    let snapshot = per("snapshot");
    eprintln!(
        "held per object: Service {services} B, EndpointSlice of {PODS_PER_SERVICE} endpoints \
         {slices} B, VirtualService of one route {routes} B, Pod {pods} B; snapshot per \
         Service (its slice, route and {PODS_PER_SERVICE} pods) {snapshot} B"
    );
    // Measured: 2.1, 2.5, 1.5 and 1.2 KB, and 8.0 KB (with labels as maps: a pod 1.7 KB
    // and the snapshot 11.1 KB; before the compact objects and the documents built on
    // demand: 6.3, 8.4, 6.5 and 1.7 KB, and 15.9 KB).
    for (what, held, bound) in [
        ("Service", services, SERVICE_BOUND),
        ("EndpointSlice", slices, SLICE_BOUND),
        ("VirtualService", routes, ROUTE_BOUND),
        ("Pod", pods, POD_BOUND),
        ("snapshot per Service", snapshot, SNAPSHOT_BOUND),
    ] {
        assert!(
            held <= bound,
            "{what}: {held} bytes held, the bound is {bound}"
        );
    }
}
