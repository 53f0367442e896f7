//! The agent's own health as `nodemesh_*` metrics, read from its parts at
//! each scrape. Per-workload series exist only for workloads enrolled on
//! this node, so their number is bounded by the node's pods.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use super::peer::label;
use super::standard::header;

/// One enrolled workload's usage.
pub struct WorkloadHealth {
    /// `namespace/name`.
    pub workload: String,
    /// Descriptors the proxy holds for it (two per proxied connection).
    pub descriptors: usize,
    pub http_requests_in_flight: u32,
    pub rejected_outbound: u64,
    pub rejected_inbound: u64,
}

/// Connections of one direction through the proxy.
pub struct DirectionHealth {
    pub direction: &'static str,
    pub open: u64,
    pub total: u64,
    pub failed: u64,
    pub rejected: u64,
}

/// What the agent reports about itself.
pub struct Health {
    pub workloads_enrolled: usize,
    pub workloads_failed: usize,
    pub config_generation: u64,
    /// Loads rejected since the agent started.
    pub config_rejected_loads: u64,
    /// The last load was rejected (the previous config keeps serving).
    pub config_last_load_failed: bool,
    pub workloads: Vec<WorkloadHealth>,
    pub directions: Vec<DirectionHealth>,
    pub hbone_open: usize,
    pub hbone_opened: u64,
    /// Connections each proxy worker serves, by worker index.
    pub worker_connections: Vec<usize>,
    /// Entries of each eBPF map.
    pub ebpf_maps: Vec<(String, usize)>,
    /// Expiry of each workload certificate held, by SPIFFE id.
    pub certificates: Vec<(String, SystemTime)>,
    /// DNS queries the workloads' responders handled, by outcome.
    pub dns: [(&'static str, u64); 6],
}

impl Health {
    pub fn write(&self, out: &mut String) {
        let single = |out: &mut String, name: &str, kind: &str, help: &str, value: f64| {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        single(
            out,
            "nodemesh_workloads_enrolled",
            "gauge",
            "Workloads enrolled on this node.",
            self.workloads_enrolled as f64,
        );
        single(
            out,
            "nodemesh_workloads_failed",
            "gauge",
            "Workloads of this node that could not be enrolled.",
            self.workloads_failed as f64,
        );
        single(
            out,
            "nodemesh_config_generation",
            "gauge",
            "Generation of the configuration in force.",
            self.config_generation as f64,
        );
        single(
            out,
            "nodemesh_config_rejected_loads_total",
            "counter",
            "Configuration loads rejected (the previous configuration kept serving).",
            self.config_rejected_loads as f64,
        );
        single(
            out,
            "nodemesh_config_last_load_failed",
            "gauge",
            "1 when the last configuration load was rejected.",
            f64::from(u8::from(self.config_last_load_failed)),
        );
        type Field = fn(&WorkloadHealth) -> f64;
        let per_workload: [(&str, &str, &str, Field); 4] = [
            (
                "nodemesh_workload_descriptors",
                "gauge",
                "Descriptors the proxy holds for a workload (two per open connection).",
                |w| w.descriptors as f64,
            ),
            (
                "nodemesh_workload_http_requests_in_flight",
                "gauge",
                "HTTP requests of a workload in flight through the proxy.",
                |w| f64::from(w.http_requests_in_flight),
            ),
            (
                "nodemesh_workload_rejected_outbound_total",
                "counter",
                "Outbound connections or requests of a workload refused at its limits.",
                |w| w.rejected_outbound as f64,
            ),
            (
                "nodemesh_workload_rejected_inbound_total",
                "counter",
                "Inbound connections to a workload refused at its limits.",
                |w| w.rejected_inbound as f64,
            ),
        ];
        for (name, kind, help, field) in per_workload {
            header(out, name, kind, help);
            for w in &self.workloads {
                let mut labels = String::new();
                label(&mut labels, "workload", &w.workload);
                let _ = writeln!(out, "{name}{{{labels}}} {}", field(w));
            }
        }
        type DirectionField = fn(&DirectionHealth) -> u64;
        let per_direction: [(&str, &str, &str, DirectionField); 4] = [
            (
                "nodemesh_proxy_connections_open",
                "gauge",
                "Connections open through the proxy.",
                |d| d.open,
            ),
            (
                "nodemesh_proxy_connections_total",
                "counter",
                "Connections accepted by the proxy.",
                |d| d.total,
            ),
            (
                "nodemesh_proxy_connections_failed_total",
                "counter",
                "Connections that ended in an error.",
                |d| d.failed,
            ),
            (
                "nodemesh_proxy_connections_rejected_total",
                "counter",
                "Connections reset at accept for lack of descriptors.",
                |d| d.rejected,
            ),
        ];
        for (name, kind, help, field) in per_direction {
            header(out, name, kind, help);
            for d in &self.directions {
                let mut labels = String::new();
                label(&mut labels, "direction", d.direction);
                let _ = writeln!(out, "{name}{{{labels}}} {}", field(d));
            }
        }
        single(
            out,
            "nodemesh_hbone_connections_open",
            "gauge",
            "HBONE connections to other nodes' agents open.",
            self.hbone_open as f64,
        );
        single(
            out,
            "nodemesh_hbone_connections_opened_total",
            "counter",
            "HBONE connections to other nodes' agents opened.",
            self.hbone_opened as f64,
        );
        let name = "nodemesh_proxy_worker_connections";
        header(
            out,
            name,
            "gauge",
            "Connections each proxy worker thread serves (HBONE and ingress included).",
        );
        for (worker, connections) in self.worker_connections.iter().enumerate() {
            let _ = writeln!(out, "{name}{{worker=\"{worker}\"}} {connections}");
        }
        header(
            out,
            "nodemesh_ebpf_map_entries",
            "gauge",
            "Entries in each of the agent's eBPF maps.",
        );
        for (map, entries) in &self.ebpf_maps {
            let mut labels = String::new();
            label(&mut labels, "map", map);
            let _ = writeln!(out, "nodemesh_ebpf_map_entries{{{labels}}} {entries}");
        }
        header(
            out,
            "nodemesh_certificate_expiry_timestamp_seconds",
            "gauge",
            "When each workload certificate held expires (Unix time).",
        );
        for (identity, expiry) in &self.certificates {
            let mut labels = String::new();
            label(&mut labels, "identity", identity);
            let seconds = expiry.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let _ = writeln!(
                out,
                "nodemesh_certificate_expiry_timestamp_seconds{{{labels}}} {seconds}"
            );
        }
        header(
            out,
            "nodemesh_dns_queries_total",
            "counter",
            "DNS queries the workloads' mesh DNS responders handled, by outcome \
             (answered, nxdomain, error, forwarded, servfail, malformed).",
        );
        for (outcome, queries) in self.dns {
            let _ = writeln!(
                out,
                "nodemesh_dns_queries_total{{outcome=\"{outcome}\"}} {queries}"
            );
        }
    }
}
