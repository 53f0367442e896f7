//! Locality-aware load balancing in the plain-host mode: node-a and node-b
//! are in two zones of one region (their Nodes' topology labels), and the
//! Service `zoned` has one endpoint in each. The caller runs on node-a.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nodemesh_testbed::config;
use nodemesh_testbed::mesh::{count_by, Mesh, CLIENT, NAMESPACE};
use nodemesh_testbed::workload_apps::Reply;

const URL: &str = "http://zoned:9080/";
const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
/// At 2000 requests an 80/20 split's standard deviation is 0.9 points.
const SPLIT_REQUESTS: usize = 2000;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// `near` on node-a (zone `z-a`) answers its first request 503; `far` on
/// node-b (zone `z-b`) is healthy.
fn zoned_mesh() -> Mesh {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    let fail_once = ["--fail-first", "1", "--fail-status", "503"];
    mesh.app("node-a", "near", &[("app", "zoned")], &fail_once)
        .unwrap();
    mesh.app("node-b", "far", &[("app", "zoned")], &[]).unwrap();
    mesh.http_service("zoned");
    mesh.start(&[]).unwrap();
    for (node, zone) in [("node-a", "z-a"), ("node-b", "z-b")] {
        let info = mesh.topo().node(node).clone();
        let doc = config::node_labelled(&info, &[(REGION, "r1"), (ZONE, zone)]);
        mesh.apply(&format!("node-{}.yaml", info.node_name), &doc)
            .unwrap();
    }
    mesh
}

fn destination_rule(traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: zoned\n\
         spec:\n  host: zoned\n  trafficPolicy:\n{traffic_policy}"
    )
}

/// Who answered each request (`status N` for an error).
fn answered_by(replies: &[Reply]) -> BTreeMap<String, u64> {
    count_by(replies, |r| match r.json() {
        Some(doc) if r.status == 200 => doc["name"].as_str().unwrap_or("?").to_owned(),
        _ => format!("status {}", r.status),
    })
}

/// `nodemesh explain`'s locality line for a request from the client.
fn explained_locality(mesh: &Mesh) -> String {
    let from = format!("{NAMESPACE}/{CLIENT}");
    let out = mesh
        .agent("node-a")
        .cli(&["explain", "--from", &from, URL, "-o", "json"])
        .unwrap();
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    explained["destinations"][0]["locality"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn requests_stay_in_the_callers_zone_fail_over_when_it_is_ejected_and_come_back() {
    let mesh = zoned_mesh();
    // Round robin would alternate; locality failover keeps the zone first.
    let policy = destination_rule(
        "    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      \
         consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 5s\n      \
         maxEjectionPercent: 100\n",
    );
    mesh.apply("zoned-dr.yaml", &policy).unwrap();

    // The first request fails in z-a: `near` is ejected, the retry and
    // everything after it go to z-b.
    let during = mesh.get_many(CLIENT, URL, 20, &[]).unwrap();
    assert_eq!(answered_by(&during), BTreeMap::from([("far".into(), 20)]));
    assert_eq!(mesh.served("near").unwrap(), 1);
    assert!(
        explained_locality(&mesh).starts_with("failover, requests go to priority 1;"),
        "{}",
        explained_locality(&mesh)
    );

    // Once its ejection ends, `near` (healthy now) takes all the traffic.
    std::thread::sleep(Duration::from_secs(6));
    let after = mesh.get_many(CLIENT, URL, 40, &[]).unwrap();
    assert_eq!(answered_by(&after), BTreeMap::from([("near".into(), 40)]));
    assert_eq!(mesh.served("far").unwrap(), 20);

    // Without outlierDetection Istio does not fail over by locality: round
    // robin alternates between the zones.
    let no_outlier = destination_rule("    loadBalancer:\n      simple: ROUND_ROBIN\n");
    mesh.apply("zoned-dr.yaml", &no_outlier).unwrap();
    let spread = mesh.get_many(CLIENT, URL, 40, &[]).unwrap();
    assert_eq!(
        answered_by(&spread),
        BTreeMap::from([("far".into(), 20), ("near".into(), 20)])
    );
}

#[test]
fn distribute_splits_by_weight_between_zones() {
    let mesh = zoned_mesh();
    let policy = destination_rule(
        "    loadBalancer:\n      localityLbSetting:\n        distribute:\n        \
         - from: r1/z-a/*\n          to:\n            r1/z-a/*: 20\n            r1/z-b/*: 80\n",
    );
    mesh.apply("zoned-dr.yaml", &policy).unwrap();
    // `near` fails its first request; the default retry policy recovers it.
    let replies = mesh.get_many(CLIENT, URL, SPLIT_REQUESTS, &[]).unwrap();
    let by = answered_by(&replies);
    let far = by.get("far").copied().unwrap_or(0) as f64 * 100.0 / SPLIT_REQUESTS as f64;
    assert!((far - 80.0).abs() <= 5.0, "{by:?}");
    assert_eq!(
        by.get("far").copied().unwrap_or(0) + by.get("near").copied().unwrap_or(0),
        SPLIT_REQUESTS as u64,
        "{by:?}"
    );

    // A setting nodemesh does not implement is refused, its field named.
    let error = mesh
        .reject(
            "zoned-dr.yaml",
            &destination_rule(
                "    loadBalancer:\n      localityLbSetting:\n        failoverPriority:\n        \
                 - topology.kubernetes.io/zone\n",
            ),
        )
        .unwrap();
    assert!(
        error.contains("localityLbSetting.failoverPriority"),
        "{error}"
    );
}
