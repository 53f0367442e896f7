//! Istio's standard metrics: requests, their durations and sizes, and TCP
//! connections and bytes, with Istio's names, types, buckets and labels.
//!
//! Recording is cheap: the caller names a call by addresses only (an
//! [`EdgeKey`], `Copy`, no string), which is resolved once per config
//! snapshot into an interned label set (an "edge": reporter, both peers,
//! the Service, the security policy) rendered once as text. Every series
//! (edge × protocol × response code × gRPC status × flags) holds atomics
//! only. A record is a lookup in its thread's own cache of series
//! ([`series_cache`]) and a few atomic adds; only a call that thread has
//! not seen under the current snapshot takes one short lock of this
//! module's own map (never one a config reload takes).
//!
//! Cardinality is bounded: at most [`MAX_EDGES`] label sets and
//! [`MAX_SERIES`] series of each kind (paths never are labels, and pods of
//! one workload share its labels). Beyond, calls are counted under the
//! reporter's `unknown` edge (every peer and service label `unknown`; HTTP
//! with `response_code="0"`), and `nodemesh_telemetry_overflow_total` says
//! how many were.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use super::flags::ResponseFlags;
use super::histogram::{self, Histogram};
use super::peer::{label, Peer, UNKNOWN};
use super::series_cache::{self, CallKey, Resolved};
use super::window::EdgeTotals;
use crate::config::{Config, ConfigStore, Protocol, Service, Workload};
use crate::identity::SpiffeId;

/// Distinct label sets (edges) kept; see the module documentation.
pub const MAX_EDGES: usize = 2048;
/// Distinct series kept per kind (HTTP, TCP).
pub const MAX_SERIES: usize = 8192;
/// Resolved address keys kept before the cache starts over.
const MAX_RESOLVED: usize = 16384;

/// Which agent reports: the caller's or the destination's, as with sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn name(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn overflow_edge(self) -> EdgeId {
        match self {
            Reporter::Source => 0,
            Reporter::Destination => 1,
        }
    }
}

/// A call, by addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EdgeKey {
    pub reporter: Reporter,
    /// The caller's address, when known.
    pub source: Option<IpAddr>,
    /// The workload address and port the call was delivered to.
    pub destination: SocketAddr,
    /// The Service address the caller dialled (the caller's side knows it).
    pub service: Option<SocketAddr>,
    /// The destination authenticated the caller (destination reporter).
    pub mutual_tls: bool,
}

/// One finished HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestDone {
    pub edge: EdgeKey,
    pub grpc: bool,
    pub code: u16,
    pub grpc_status: Option<u16>,
    pub flags: ResponseFlags,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// One finished TCP connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionDone {
    pub edge: EdgeKey,
    /// Its opening and bytes were counted while it was relayed (through
    /// [`LiveBytes`]); otherwise they are counted now, with its close.
    pub live: bool,
    pub flags: ResponseFlags,
    /// Caller to destination.
    pub received: u64,
    /// Destination to caller.
    pub sent: u64,
}

type EdgeId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RequestKey {
    edge: EdgeId,
    grpc: bool,
    code: u16,
    grpc_status: Option<u16>,
    flags: ResponseFlags,
}

impl RequestKey {
    /// Where calls go once [`MAX_SERIES`] series are held: one series per
    /// reporter, every label `unknown` and `response_code="0"`.
    fn overflow(reporter: Reporter) -> RequestKey {
        RequestKey {
            edge: reporter.overflow_edge(),
            grpc: false,
            code: 0,
            grpc_status: None,
            flags: ResponseFlags::NONE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnectionKey {
    edge: EdgeId,
    flags: ResponseFlags,
}

pub(super) struct RequestSeries {
    total: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The byte counters of a relayed TCP connection, added to as bytes move,
/// so a long-lived connection's traffic shows before it closes (Istio's
/// proxies report such connections every few seconds).
#[derive(Clone)]
pub struct LiveBytes {
    series: Arc<ConnectionSeries>,
    /// The relay's client side is the destination (an inbound tunnel).
    reversed: bool,
    /// The other reporter's counters of the same bytes, for a relay this
    /// agent reports as both ends (between two workloads of its node).
    also: Option<Box<LiveBytes>>,
}

impl LiveBytes {
    /// `n` bytes moved from the relay's client side to its upstream side
    /// (`true`), or back.
    pub fn moved(&self, to_upstream: bool, n: u64) {
        let counter = if to_upstream != self.reversed {
            &self.series.received
        } else {
            &self.series.sent
        };
        counter.fetch_add(n, Ordering::Relaxed);
        if let Some(also) = &self.also {
            also.moved(to_upstream, n);
        }
    }

    /// The same counters for a relay whose client side is the destination.
    pub fn reversed(self) -> LiveBytes {
        LiveBytes {
            reversed: !self.reversed,
            also: self.also.map(|also| Box::new(also.reversed())),
            ..self
        }
    }

    /// Counters that add to both `one` and `other` (either may be off).
    pub fn both(one: Option<LiveBytes>, other: Option<LiveBytes>) -> Option<LiveBytes> {
        match (one, other) {
            (Some(one), Some(other)) => Some(LiveBytes {
                also: Some(Box::new(other)),
                ..one
            }),
            (one, other) => one.or(other),
        }
    }
}

/// Picks one of a series' histograms or counters, for writing families.
type HistogramOf = fn(&RequestSeries) -> &Histogram;
type CounterOf = fn(&ConnectionSeries) -> &AtomicU64;

#[derive(Default)]
struct ConnectionSeries {
    opened: AtomicU64,
    closed: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

struct State {
    /// The config snapshot `resolved` was made against (compared by
    /// address; the `Weak` keeps the address from being reused).
    snapshot: Weak<Config>,
    resolved: HashMap<EdgeKey, EdgeId>,
    /// Rendered label sets, by id; ids never change, so series stay valid
    /// across reloads.
    edges: Vec<Arc<str>>,
    by_labels: HashMap<Arc<str>, EdgeId>,
    requests: HashMap<RequestKey, Arc<RequestSeries>>,
    connections: HashMap<ConnectionKey, Arc<ConnectionSeries>>,
}

/// See the module documentation.
pub struct Standard {
    /// Tells this instance's entries in each thread's [`series_cache`].
    id: u64,
    config: Arc<ConfigStore>,
    trust_domain: String,
    state: Mutex<State>,
    overflow: AtomicU64,
}

impl Standard {
    pub fn new(config: Arc<ConfigStore>, trust_domain: &str) -> Standard {
        let mut state = State {
            snapshot: Weak::new(),
            resolved: HashMap::new(),
            edges: Vec::new(),
            by_labels: HashMap::new(),
            requests: HashMap::new(),
            connections: HashMap::new(),
        };
        for reporter in [Reporter::Source, Reporter::Destination] {
            let unknown = render(reporter, &Peer::unknown(), &Peer::unknown(), None, "");
            let id = intern(&mut state, unknown).unwrap_or_default();
            debug_assert_eq!(id, reporter.overflow_edge());
        }
        static INSTANCES: AtomicU64 = AtomicU64::new(1);
        Standard {
            id: INSTANCES.fetch_add(1, Ordering::Relaxed),
            config,
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(state),
            overflow: AtomicU64::new(0),
        }
    }

    pub fn record_request(&self, done: &RequestDone) {
        let config = self.config.current();
        let key = CallKey {
            edge: done.edge,
            grpc: done.grpc,
            code: done.code,
            grpc_status: done.grpc_status,
            flags: done.flags,
        };
        let resolve = || self.request_series(&config, &key);
        series_cache::with_request_series(self.id, &config, key, resolve, |resolved| {
            if resolved.overflowed {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
            let series = &resolved.series;
            series.total.fetch_add(1, Ordering::Relaxed);
            series
                .duration
                .observe(done.duration.as_secs_f64() * 1000.0);
            series.request_bytes.observe(done.request_bytes as f64);
            series.response_bytes.observe(done.response_bytes as f64);
        });
    }

    /// The series of the call `call`, created unless a bound was reached
    /// (then the reporter's overflow series).
    fn request_series(&self, config: &Arc<Config>, call: &CallKey) -> Resolved {
        let mut state = self.lock();
        let edge = self.edge(&mut state, config, &call.edge);
        let key = RequestKey {
            edge,
            grpc: call.grpc,
            code: call.code,
            grpc_status: call.grpc_status,
            flags: call.flags,
        };
        let kept = state.requests.len() < MAX_SERIES || state.requests.contains_key(&key);
        let key = match kept {
            true => key,
            false => RequestKey::overflow(call.edge.reporter),
        };
        let series = state
            .requests
            .entry(key)
            .or_insert_with(|| {
                Arc::new(RequestSeries {
                    total: AtomicU64::new(0),
                    duration: Histogram::new(histogram::DURATION_MS),
                    request_bytes: Histogram::new(histogram::BYTES),
                    response_bytes: Histogram::new(histogram::BYTES),
                })
            })
            .clone();
        Resolved {
            series,
            overflowed: !kept,
        }
    }

    /// The counters of a relay that started, under its edge without flags;
    /// counts it opened when `open`.
    pub fn record_connection_live(&self, edge: &EdgeKey, open: bool) -> LiveBytes {
        let series = self.connection_series(edge, ResponseFlags::NONE);
        if open {
            series.opened.fetch_add(1, Ordering::Relaxed);
        }
        LiveBytes {
            series,
            reversed: false,
            also: None,
        }
    }

    pub fn record_connection(&self, done: &ConnectionDone) {
        let series = self.connection_series(&done.edge, done.flags);
        series.closed.fetch_add(1, Ordering::Relaxed);
        if !done.live {
            series.opened.fetch_add(1, Ordering::Relaxed);
            series.received.fetch_add(done.received, Ordering::Relaxed);
            series.sent.fetch_add(done.sent, Ordering::Relaxed);
        }
    }

    /// The series of `edge` with `flags`, created unless a bound was reached
    /// (then the reporter's overflow series).
    fn connection_series(&self, edge: &EdgeKey, flags: ResponseFlags) -> Arc<ConnectionSeries> {
        let config = self.config.current();
        let mut state = self.lock();
        let id = self.edge(&mut state, &config, edge);
        let key = ConnectionKey { edge: id, flags };
        let kept = state.connections.len() < MAX_SERIES;
        let key = if kept || state.connections.contains_key(&key) {
            key
        } else {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            ConnectionKey {
                edge: edge.reporter.overflow_edge(),
                flags: ResponseFlags::NONE,
            }
        };
        state.connections.entry(key).or_default().clone()
    }

    /// Calls counted under an `unknown` edge because a bound was reached.
    pub fn overflowed(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Label sets and series held (for `nodemesh_telemetry_*`).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let state = self.lock();
        (
            state.edges.len(),
            state.requests.len(),
            state.connections.len(),
        )
    }

    /// Every label set's totals so far, summed over its series (for the
    /// windowed stats of `nodemesh stat`, `top` and `graph`).
    pub fn totals(&self) -> HashMap<Arc<str>, EdgeTotals> {
        let state = self.lock();
        let mut totals: HashMap<EdgeId, EdgeTotals> = HashMap::new();
        for (key, series) in &state.requests {
            let edge = totals.entry(key.edge).or_default();
            edge.add_requests(
                key.code,
                series.total.load(Ordering::Relaxed),
                series.duration.counts(),
            );
        }
        for (key, series) in &state.connections {
            let edge = totals.entry(key.edge).or_default();
            edge.tcp_opened += series.opened.load(Ordering::Relaxed);
            edge.tcp_closed += series.closed.load(Ordering::Relaxed);
            edge.tcp_sent += series.sent.load(Ordering::Relaxed);
            edge.tcp_received += series.received.load(Ordering::Relaxed);
        }
        totals
            .into_iter()
            .map(|(id, t)| (state.edges[id as usize].clone(), t))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The edge of `key`, resolved against the current config when this
    /// snapshot has not seen it. The snapshot is read lock-free, as the
    /// request path reads it: no lock is shared with reloads.
    fn edge(&self, state: &mut State, config: &Arc<Config>, key: &EdgeKey) -> EdgeId {
        let same = std::ptr::eq(state.snapshot.as_ptr(), Arc::as_ptr(config));
        if !same || state.resolved.len() >= MAX_RESOLVED {
            state.snapshot = Arc::downgrade(config);
            state.resolved.clear();
        }
        if let Some(&id) = state.resolved.get(key) {
            return id;
        }
        let labels = self.resolve(config, key);
        let id = intern(state, labels).unwrap_or_else(|| {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            key.reporter.overflow_edge()
        });
        state.resolved.insert(*key, id);
        id
    }

    fn resolve(&self, cfg: &Config, key: &EdgeKey) -> String {
        let (source, destination, service) = peers(cfg, &self.trust_domain, key);
        let security = match (key.reporter, key.mutual_tls) {
            (Reporter::Source, _) => "unknown",
            (Reporter::Destination, true) => "mutual_tls",
            (Reporter::Destination, false) => "none",
        };
        let service = service.map(|s| (s, cfg.cluster_domain()));
        render(key.reporter, &source, &destination, service, security)
    }

    /// Appends the text exposition of every Istio metric.
    pub fn write(&self, out: &mut String) {
        let (edges, requests, connections) = {
            let state = self.lock();
            let requests: Vec<_> = state
                .requests
                .iter()
                .map(|(k, s)| (*k, s.clone()))
                .collect();
            let connections: Vec<_> = state
                .connections
                .iter()
                .map(|(k, s)| (*k, s.clone()))
                .collect();
            (state.edges.clone(), requests, connections)
        };
        let request_labels = |key: &RequestKey| {
            let mut labels = edges[key.edge as usize].to_string();
            label(
                &mut labels,
                "request_protocol",
                if key.grpc { "grpc" } else { "http" },
            );
            label(&mut labels, "response_code", &key.code.to_string());
            let grpc_status = key.grpc_status.map(|s| s.to_string());
            label(
                &mut labels,
                "grpc_response_status",
                grpc_status.as_deref().unwrap_or(""),
            );
            label(&mut labels, "response_flags", &key.flags.render());
            labels
        };
        let requests: Vec<_> = requests
            .into_iter()
            .map(|(key, series)| (request_labels(&key), series))
            .collect();
        header(
            out,
            "istio_requests_total",
            "counter",
            "Requests, by Istio's labels.",
        );
        for (labels, series) in &requests {
            let total = series.total.load(Ordering::Relaxed);
            let _ = writeln!(out, "istio_requests_total{{{labels}}} {total}");
        }
        let histograms: [(&str, &str, HistogramOf); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request durations, from the request's start to its last response byte.",
                |s| &s.duration,
            ),
            ("istio_request_bytes", "Request body sizes.", |s| {
                &s.request_bytes
            }),
            ("istio_response_bytes", "Response body sizes.", |s| {
                &s.response_bytes
            }),
        ];
        for (name, help, histogram) in histograms {
            header(out, name, "histogram", help);
            for (labels, series) in &requests {
                histogram(series).write(out, name, labels);
            }
        }

        let connection_labels = |key: &ConnectionKey| {
            let mut labels = edges[key.edge as usize].to_string();
            label(&mut labels, "request_protocol", "tcp");
            label(&mut labels, "response_flags", &key.flags.render());
            labels
        };
        let connections: Vec<_> = connections
            .into_iter()
            .map(|(key, series)| (connection_labels(&key), series))
            .collect();
        let counters: [(&str, &str, CounterOf); 4] = [
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the caller on TCP connections (counted as they move).",
                |s| &s.sent,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the caller on TCP connections (counted as they move).",
                |s| &s.received,
            ),
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened (counted when the relay to the upstream starts).",
                |s| &s.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                |s| &s.closed,
            ),
        ];
        for (name, help, counter) in counters {
            header(out, name, "counter", help);
            for (labels, series) in &connections {
                let value = counter(series).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }
}

/// Both sides of a call and the Service called, as far as the reporter
/// knows them: the destination knows its caller's principal from mutual
/// TLS; the caller knows its own, and the destination's when it is in the
/// mesh.
pub fn peers<'a>(
    cfg: &'a Config,
    trust_domain: &str,
    key: &EdgeKey,
) -> (Peer, Peer, Option<&'a Service>) {
    let principal =
        |w: &Workload| SpiffeId::new(trust_domain, &w.namespace, &w.service_account).to_string();
    let source_workload = key.source.and_then(|ip| cfg.workload_by_address(ip));
    let destination_workload = cfg.workload_by_address(key.destination.ip());
    let known = key.reporter == Reporter::Source || key.mutual_tls;
    // Only the ingress calls from a node's own address.
    let from_node = key
        .source
        .is_some_and(|ip| cfg.nodes().any(|n| n.addresses.contains(&ip)));
    let source = match source_workload {
        Some(w) => Peer::of(w, known.then(|| principal(w))),
        None if from_node => {
            let id = crate::identity::ingress_id(cfg, trust_domain);
            Peer::ingress(cfg.root_namespace(), known.then(|| id.to_string()))
        }
        None => Peer::unknown(),
    };
    let destination = destination_workload.map_or_else(Peer::unknown, |w| {
        let known = key.reporter == Reporter::Destination || cfg.is_enrolled(w);
        Peer::of(w, known.then(|| principal(w)))
    });
    let service = match key.service {
        Some(addr) => cfg.service_by_cluster_ip(addr.ip()),
        None => destination_workload.and_then(|w| serving(cfg, w, key.destination.port())),
    };
    (source, destination, service)
}

/// Writes a family's `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The id of `labels`, interned; `None` once [`MAX_EDGES`] are held.
fn intern(state: &mut State, labels: String) -> Option<EdgeId> {
    if let Some(&id) = state.by_labels.get(labels.as_str()) {
        return Some(id);
    }
    if state.edges.len() >= MAX_EDGES {
        return None;
    }
    let id = state.edges.len() as EdgeId;
    let labels: Arc<str> = labels.into();
    state.edges.push(labels.clone());
    state.by_labels.insert(labels, id);
    Some(id)
}

/// The Service of `w` that serves its port `port` (the first by name).
fn serving<'a>(cfg: &'a Config, w: &Workload, port: u16) -> Option<&'a Service> {
    cfg.services().iter().find(|s| {
        s.namespace == w.namespace
            && !s.selector.is_empty()
            && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            && s.ports
                .iter()
                .any(|p| p.target_port == port && p.protocol == Protocol::Tcp)
    })
}

fn render(
    reporter: Reporter,
    source: &Peer,
    destination: &Peer,
    service: Option<(&Service, &str)>,
    security: &str,
) -> String {
    let mut out = String::new();
    label(&mut out, "reporter", reporter.name());
    source.render("source", &mut out);
    destination.render("destination", &mut out);
    let (host, name, namespace) = match service {
        Some((s, domain)) => (s.host(domain), s.name.as_str(), s.namespace.as_str()),
        None => (UNKNOWN.to_owned(), UNKNOWN, UNKNOWN),
    };
    label(&mut out, "destination_service", &host);
    label(&mut out, "destination_service_name", name);
    label(&mut out, "destination_service_namespace", namespace);
    label(
        &mut out,
        "connection_security_policy",
        if security.is_empty() {
            UNKNOWN
        } else {
            security
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::flags::Flag;

    fn request(code: u16, flags: ResponseFlags) -> RequestDone {
        RequestDone {
            edge: EdgeKey {
                reporter: Reporter::Destination,
                source: None,
                destination: SocketAddr::from(([10, 0, 0, 1], 80)),
                service: None,
                mutual_tls: false,
            },
            grpc: false,
            code,
            grpc_status: None,
            flags,
            duration: Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
        }
    }

    fn standard() -> Standard {
        Standard::new(Arc::new(ConfigStore::unloaded()), "cluster.local")
    }

    #[test]
    fn series_stay_bounded_and_overflow_is_counted() {
        let metrics = standard();
        let flags = [ResponseFlags::NONE, ResponseFlags::of(Flag::FaultInjected)];
        let mut calls = 0;
        for code in 100..1000 {
            for flag in flags {
                for grpc_status in 0..6 {
                    let mut call = request(code, flag);
                    call.grpc_status = Some(grpc_status);
                    metrics.record_request(&call);
                    calls += 1;
                }
            }
        }
        assert!(calls > MAX_SERIES);
        let (_, series, _) = metrics.sizes();
        assert_eq!(series, MAX_SERIES + 1);
        assert_eq!(metrics.overflowed(), (calls - MAX_SERIES) as u64);
        let mut out = String::new();
        metrics.write(&mut out);
        assert!(out.contains("response_code=\"0\""));
    }

    #[test]
    fn one_call_is_one_count_in_every_family() {
        let metrics = standard();
        metrics.record_request(&request(503, ResponseFlags::of(Flag::FaultInjected)));
        metrics.record_request(&request(503, ResponseFlags::of(Flag::FaultInjected)));
        let mut out = String::new();
        metrics.write(&mut out);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {out}"))
                .to_owned()
        };
        let total = line("istio_requests_total{");
        assert!(total.ends_with(" 2"), "{total}");
        assert!(total.contains("reporter=\"destination\""), "{total}");
        assert!(total.contains("response_flags=\"FI\""), "{total}");
        assert!(
            total.contains("connection_security_policy=\"none\""),
            "{total}"
        );
        assert!(line("istio_request_duration_milliseconds_count{").ends_with(" 2"));
        assert!(line("istio_response_bytes_sum{").ends_with(" 40"));
    }

    /// A store whose workload at 10.0.0.1 is `name`.
    fn load_workload(store: &ConfigStore, name: &str) {
        let doc = format!(
            "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, \
             namespace: default}}\nspec: {{netns: /run/netns/{name}, addresses: [10.0.0.1], \
             node: n1}}\n"
        );
        let docs = [(std::path::PathBuf::from("w.yaml"), doc)];
        let options = crate::config::LoadOptions::default();
        store.replace(Config::load_documents(&docs, &options).unwrap());
    }

    /// `istio_requests_total` by destination workload.
    fn totals_by_destination(metrics: &Standard) -> Vec<(String, u64)> {
        let mut out = String::new();
        metrics.write(&mut out);
        let mut totals: Vec<(String, u64)> = out
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(|l| {
                let workload = l.split("destination_workload=\"").nth(1).unwrap_or("");
                let workload = workload.split('"').next().unwrap_or("").to_owned();
                (workload, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect();
        totals.sort();
        totals
    }

    #[test]
    fn calls_follow_the_config_and_threads_share_series() {
        let store = Arc::new(ConfigStore::unloaded());
        load_workload(&store, "reviews-v1");
        let metrics = Arc::new(Standard::new(store.clone(), "cluster.local"));
        metrics.record_request(&request(200, ResponseFlags::NONE));
        let other = metrics.clone();
        std::thread::spawn(move || other.record_request(&request(200, ResponseFlags::NONE)))
            .join()
            .unwrap();
        assert_eq!(totals_by_destination(&metrics), [("reviews-v1".into(), 2)]);
        // The same call under a new snapshot resolves to the new labels.
        load_workload(&store, "reviews-v2");
        metrics.record_request(&request(200, ResponseFlags::NONE));
        assert_eq!(
            totals_by_destination(&metrics),
            [("reviews-v1".into(), 2), ("reviews-v2".into(), 1)]
        );
        // Another instance's calls never land in this one's series.
        let fresh = standard();
        fresh.record_request(&request(200, ResponseFlags::NONE));
        assert_eq!(totals_by_destination(&fresh), [("unknown".into(), 1)]);
        assert_eq!(metrics.sizes().1, 2);
    }

    /// The sum of one TCP family over every series.
    fn tcp_total(metrics: &Standard, family: &str) -> u64 {
        let mut out = String::new();
        metrics.write(&mut out);
        out.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    #[test]
    fn a_relay_counts_when_it_opens_and_as_bytes_move_then_its_close() {
        let metrics = standard();
        let edge = request(0, ResponseFlags::NONE).edge;
        let live = metrics.record_connection_live(&edge, true);
        live.moved(true, 5);
        live.clone().reversed().moved(true, 7);
        assert_eq!(tcp_total(&metrics, "istio_tcp_connections_opened_total"), 1);
        assert_eq!(tcp_total(&metrics, "istio_tcp_connections_closed_total"), 0);
        assert_eq!(tcp_total(&metrics, "istio_tcp_received_bytes_total"), 5);
        assert_eq!(tcp_total(&metrics, "istio_tcp_sent_bytes_total"), 7);
        let closed = |live| ConnectionDone {
            edge,
            live,
            flags: ResponseFlags::of(Flag::UpstreamConnectionTermination),
            received: 5,
            sent: 7,
        };
        metrics.record_connection(&closed(true));
        // One that failed before its relay started counts all at its close.
        metrics.record_connection(&closed(false));
        assert_eq!(tcp_total(&metrics, "istio_tcp_connections_opened_total"), 2);
        assert_eq!(tcp_total(&metrics, "istio_tcp_connections_closed_total"), 2);
        assert_eq!(tcp_total(&metrics, "istio_tcp_received_bytes_total"), 10);
        assert_eq!(tcp_total(&metrics, "istio_tcp_sent_bytes_total"), 14);
    }
}
