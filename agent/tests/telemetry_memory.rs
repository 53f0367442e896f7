//! What Istio's metrics hold as the pods calling each other grow: heap bytes
//! of the metric series, counted by the allocator of `counting`. One tenant
//! with many pods must not blow up the agent's memory, so the series stop
//! growing at their bounds and further pods only add to the overflow count.
//! The figures are printed, run with `--nocapture`. Everything runs in one
//! test (the counter counts the test's own thread).

mod counting;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use counting::live_bytes;
use nodemesh::config::{Config, ConfigStore, LoadOptions};
use nodemesh::telemetry::flags::ResponseFlags;
use nodemesh::telemetry::standard::{self, Standard};
use nodemesh::telemetry::{EdgeKey, Reporter, RequestDone};

/// Pods of the tenant: more than the series' and the resolver's bounds.
const PODS: usize = 20_000;

fn address(pod: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        8,
        (pod / 250) as u8,
        (pod % 250 + 1) as u8,
    ))
}

/// One namespace of `PODS` workloads, each its own Deployment-level name.
fn tenant() -> Config {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {nodemesh.io/mesh: enabled}}\n",
    );
    for pod in 0..PODS {
        let _ = write!(
            yaml,
            "---\napiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {{name: w{pod}, \
             namespace: big, labels: {{app: w{pod}, version: v1}}}}\nspec: {{netns: /run/netns/w{pod}, \
             addresses: [\"{}\"], node: n1}}\n",
            address(pod)
        );
    }
    let files = [(PathBuf::from("tenant.yaml"), yaml)];
    Config::load_documents(&files, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("the tenant does not load: {e}"))
}

/// Pod `pod` calls the next pod; its destination reports it, with two
/// response codes.
fn call(metrics: &Standard, pod: usize) {
    for code in [200, 503] {
        metrics.record_request(&RequestDone {
            edge: EdgeKey {
                reporter: Reporter::Destination,
                source: Some(address(pod)),
                destination: SocketAddr::new(address((pod + 1) % PODS), 9080),
                service: None,
                mutual_tls: true,
            },
            grpc: false,
            code,
            grpc_status: None,
            flags: ResponseFlags::NONE,
            duration: Duration::from_millis(2),
            request_bytes: 100,
            response_bytes: 1000,
        });
    }
}

#[test]
fn metric_memory_stops_growing_at_its_bounds_as_pods_grow() {
    let store = Arc::new(ConfigStore::unloaded());
    store.replace(tenant());
    let before = live_bytes();
    let metrics = Standard::new(store, "cluster.local");
    let mut held = Vec::new();
    for pod in 0..PODS {
        call(&metrics, pod);
        if (pod + 1) % 2_500 == 0 {
            held.push((pod + 1, live_bytes() - before));
        }
    }
    for (pods, bytes) in &held {
        eprintln!("{pods} calling pods: {} KB of metric series", bytes / 1024);
    }
    let (edges, series, _) = metrics.sizes();
    assert!(edges <= standard::MAX_EDGES + 2, "{edges} label sets");
    assert!(series <= standard::MAX_SERIES + 1, "{series} series");
    assert!(metrics.overflowed() > 0);
    // Past every bound (label sets, series, resolved callers), more pods
    // cost nothing more.
    let (_, at_bound) = held[held.len() - 2];
    let (_, at_end) = held[held.len() - 1];
    assert!(
        at_end - at_bound < 16 * 1024,
        "metric series grew from {at_bound} to {at_end} bytes past their bounds"
    );
}
