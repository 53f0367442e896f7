//! `cargo xtask bench [--duration 10s | --quick] [--rounds N]`: what the mesh costs,
//! measured against a direct, un-meshed run and against a real peer, an
//! HAProxy pair with mutual TLS, on the same topology in the same invocation
//! (DESIGN.md, "Targets to design for").
//!
//! Topology: two nodes (one agent each), a `client` pod on node-a and a
//! `server` pod on node-b, so meshed traffic takes the design's two-agent
//! path (outbound on the client's node, inbound on the server's node). The
//! server pod runs nginx (one worker, 1 KB `return 200` responses, so the
//! backend is not the bottleneck) and an iperf3 server; the load comes from
//! oha and the iperf3 client in the client pod. HAProxy A runs in node-a's
//! netns, HAProxy B in node-b's (see `haproxy.rs`).
//!
//! The pods' namespace `bench` also holds a Service `server` (port 80,
//! named `http`, so declared HTTP) with a VirtualService. A round runs these
//! modes, each over the same pods and addresses:
//! - DIRECT: the namespace is not labelled (the agents run but capture
//!   nothing); requests go to the server pod's address.
//! - HAPROXY PAIR: still not labelled; requests go to HAProxy A (plain
//!   HTTP), which forwards them over TLS 1.3 with a client certificate to
//!   HAProxy B, which forwards them to nginx; bulk TCP goes the same way
//!   to the iperf3 server, relayed in `mode tcp`.
//! - NODEMESH + mTLS: the namespace labelled `nodemesh.io/mesh: enabled`;
//!   the agents hold their workloads' certificates from the test bed's mesh
//!   CA and reach each other over mutual TLS (HBONE), as by default.
//!   Requests to the pod's address are relayed as opaque TCP by the
//!   client-side agent (L4 + mTLS; the server-side agent serves nginx's
//!   port as the HTTP its Service declares, to set the caller's
//!   `X-Forwarded-Client-Cert`, and iperf3's undeclared port as opaque
//!   TCP); requests to the Service's cluster IP are terminated and routed
//!   by the client-side agent (L7 + mTLS).
//! - NODEMESH, PLAINTEXT HOP: the same agents with a mesh-wide
//!   PeerAuthentication `DISABLE` (root namespace `istio-system`), so
//!   automatic mTLS chooses a plaintext hop: L7 to the Service only, the
//!   path as it was before mutual TLS, for comparison.
//!
//! Every path (direct, HAProxy pair, L4 + mTLS, L7 + mTLS, L7 plaintext hop)
//! gets the same phases:
//! 1. HTTP/1.1 max throughput: 16 keep-alive connections, 1 KB responses;
//! 2. latency at a fixed 2000 req/s over 16 connections (p50, p90, p99);
//! 3. connection rate: a new TCP connection per request (oha
//!    `--disable-keepalive`), 16 concurrent;
//!
//! and besides, direct, the HAProxy pair and nodemesh + mTLS:
//! 4. bulk TCP: iperf3, one stream (L4), with the proxies' CPU per GB;
//! 5. nodemesh + mTLS only, L7: phases 1 to 3 to the Service, once with a
//!    VirtualService of 10 routes (the headline L7 figures) and once with
//!    10 000, requests matching only the last route (see `routes.rs`); the
//!    difference is what the size of a route table costs each request.
//!    Before each, the bench checks that both agents serve the table and
//!    that a request is answered by nginx through that last route.
//!    Then the same phases (10 routes) with an allow-list of 10 and of
//!    1 000 rules on the server (see `authz.rs`), and under a mesh-wide
//!    `Telemetry` resource: Istio's metrics off, and every request traced
//!    (see `telemetry.rs`). The agents always trace to a real OTLP
//!    receiver in node-a's namespace, at Istio's default 1 %, so the
//!    headline L7 figures carry the cost of metrics and default tracing.
//! 6. the ingress: phases 1 to 3 from a host outside the mesh, through
//!    node-a's agent serving an Istio Gateway, over mutual TLS to node-b
//!    (nodemesh + mTLS), and straight to the server pod (direct); see
//!    `ingress.rs`.
//! 7. HTTP/2 with prior knowledge (h2c, as gRPC runs in a mesh): phases 1
//!    to 3 with 8 streams in flight on each connection, straight to nginx's
//!    HTTP/2 port (direct) and to the Service's `http2` port (nodemesh +
//!    mTLS, 10 routes; the agents keep the client's HTTP/2 on every hop).
//!
//! Before a meshed mode is measured, the bench checks the hop its requests
//! take: nginx echoes the `X-Forwarded-Client-Cert` that the destination
//! agent sets for callers authenticated by mutual TLS (see `mtls.rs`).
//! Before the HAProxy pair is measured, the bench checks that a request
//! through it reaches nginx over TLS 1.3 with A's certificate, and that B
//! refuses a TLS client without one.
//!
//! `--rounds N` repeats every mode and reports medians: on shared 2-vCPU
//! VMs one round's direct req/s varies by up to ±20 % from run to run.
//!
//! During every phase the CPU time of the path's two proxies (the agents,
//! or the HAProxies), the servers, the load generator and the whole machine
//! is sampled from /proc: the proxies' CPU per 1000 requests comes from
//! phases 1 and 2 (at 2000 req/s every path sees the same request rate) and
//! per 1000 connections from phase 3, and a phase in which other work or
//! hypervisor steal took a noticeable share of the machine is flagged. The
//! proxies' RSS (and peak) is read after every phase; the tables show it
//! after each path's phases of the first round (an agent's RSS does not
//! shrink once the 10 000-route table is replaced). Results are printed as
//! three tables: every path against direct, with the design targets for
//! L7 + mTLS judged on the best nodemesh L7 path measured (informative only:
//! a missed target never fails the command; errors in the traffic do);
//! nodemesh's paths against the HAProxy pair; and 10 000 routes against
//! 10. Everything is also written to `target/bench/results.json`.
//!
//! Benchmark-harness tuning, applied to every namespace of the topology in
//! all modes alike: `net.ipv4.tcp_tw_reuse=1` and a wide ephemeral port
//! range, so that the connection-rate phase (tens of thousands of short
//! connections to one address) does not run out of ports because of
//! TIME_WAIT.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::config::ServicePort;
use nodemesh_testbed::workload_apps::wait_listening;
use nodemesh_testbed::{config, otlp, Agent, Topology};
use serde_json::{json, Value};

mod authz;
mod counters;
mod focus;
mod haproxy;
mod held;
mod ingress;
mod mtls;
mod probe;
mod procfs;
mod report;
mod results;
mod routes;
mod telemetry;

use haproxy::HaproxyPair;
use probe::Probe;
use procfs::{
    children_cpu_ticks, clock_ticks_per_second, loadavg, machine_ticks, num_cpus,
    proc_context_switches, proc_cpu_ticks, proc_memory_kib,
};
use report::{comparison, cpu_breakdown, l7_table};
use results::{
    per_1000, Bulk, Captured, CpuSnapshot, CpuUse, HttpPhases, HttpRun, HttpVersion, L7Result,
    Memory, Mode, ModeResult, PathResult, Transfer, Variant,
};

const USAGE: &str = "\
usage: cargo xtask bench [--pgo] [--duration DURATION | --quick] [--rounds N]
                         [--focus [--http2] [--allocations] [--against NODEMESH]...]

  --pgo          bench the profile-guided build (`cargo xtask build --pgo`)
  --results F    write the full run's results to F (default
                 target/bench/results.json)
  --duration D   length of each oha phase, e.g. 10s, 1500ms, 1m (default 10s)
  --quick        smoke run: 3 s phases
  --rounds N     repeat every mode N times and report medians (default 1)
  --focus        only direct and L7 + mTLS (max throughput, 2000 req/s),
                 new L4 + mTLS connections and bulk TCP, with each agent's
                 syscalls and context switches per request (perf stat):
                 for profiling
  --http2        with --focus: the L7 phases in HTTP/2 with prior knowledge
                 (8 streams on each connection), direct to nginx's HTTP/2
                 port and meshed to the Service's `http2` port
  --allocations  with --focus: count allocations per request too (uprobes:
                 they slow every allocation, so that run's times are skewed)
  --against B    with --focus: the same phases with the agent binary B,
                 alternating with this build's in every round (A/B);
                 may be given more than once
";

/// The Kubernetes namespace of both pods.
const NAMESPACE: &str = "bench";
const CLIENT: &str = "client";
const SERVER: &str = "server";
const HTTP_PORT: u16 = 8080;
/// The Service's port; named `http`, so the agent routes it without
/// waiting for detection.
const SERVICE_PORT: u16 = 80;
/// nginx's HTTP/2 port (h2c, prior knowledge), for the HTTP/2 phases.
const HTTP2_PORT: u16 = 8081;
/// The Service's port to it, named `http2`.
const SERVICE_HTTP2_PORT: u16 = 81;
/// Streams each HTTP/2 connection of the load keeps in flight (oha `-p`).
const HTTP2_STREAMS: &str = "8";
/// The response header in which nginx names the protocol it was asked in.
const PROTOCOL_HEADER: &str = "x-bench-protocol";
/// Pinned rather than allocated, so the URL is known up front and no DNS
/// lookup sits in the measurement.
const SERVICE_IP: &str = "10.96.0.80";
/// Route-table sizes of the L7 phases; the first gives the headline L7
/// figures, the comparison with the last the cost of a table's size.
const ROUTE_COUNTS: [usize; 2] = [10, 10_000];
const IPERF_PORT: u16 = 5201;
/// oha connections (design: 16 keep-alive connections).
const CONNECTIONS: u32 = 16;
/// The fixed rate of the latency phase, req/s.
const FIXED_RATE: u32 = 2000;
/// nginx's response body size.
const BODY_SIZE: usize = 1024;
/// Longest iperf3 run.
const BULK_MAX: Duration = Duration::from_secs(5);
const WARMUP: Duration = Duration::from_secs(1);
/// A phase fails when more than this fraction of its requests failed.
const MAX_ERROR_FRACTION: f64 = 0.01;
/// How long the agents get to apply a config change.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(15);
/// Fine enough to time how fast a route change is served.
const CONFIG_POLL: Duration = Duration::from_millis(10);
/// oha's name for requests cut off by `-z` (not a server error).
const OHA_DEADLINE_ERROR: &str = "aborted due to deadline";
/// CPUs of other work during a phase above which the bench warns that the
/// figures are skewed.
const INTERFERENCE_CPUS: f64 = 0.2;
/// The same for CPU time stolen by the hypervisor.
const STEAL_CPUS: f64 = 0.1;

// Design targets for L7 + mTLS through two agents (DESIGN.md, "Targets to
// design for"); besides these, ahead of the HAProxy pair.
const TARGET_RPS_PERCENT: f64 = 48.0;
const TARGET_P50_DELTA_MS: f64 = 0.15;
const TARGET_CPU_MS_PER_1000: f64 = 20.0;
const TARGET_CPU_MS_PER_1000_FIXED_RATE: f64 = 60.0;
const TARGET_RSS_MB: f64 = 12.0;
const TARGET_BULK_PERCENT: f64 = 60.0;

/// The programs the bench runs besides the agents.
struct Tools {
    nginx: PathBuf,
    iperf3: PathBuf,
    haproxy: PathBuf,
}

pub fn run(nodemesh: &Path, args: &[String]) -> Result<()> {
    let Some(opts) = Options::parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let oha = Oha::find_or_install()?;
    let tools = Tools {
        nginx: find_program("nginx", &["/usr/sbin/nginx"])?,
        iperf3: find_program("iperf3", &["/usr/bin/iperf3"])?,
        haproxy: find_program("haproxy", &["/usr/sbin/haproxy"])?,
    };
    let clk_tck = clock_ticks_per_second();
    if opts.focus {
        return focus::run(nodemesh, &oha, &tools, &opts, clk_tck);
    }
    let load_before = loadavg();
    let modes = Mode::ALL;

    println!(
        "bench: {} per oha phase, {} iperf3, {CONNECTIONS} connections, {BODY_SIZE} B responses \
         (oha {}, {} CPUs, load average {})",
        human(opts.duration),
        human(opts.bulk),
        oha.version,
        num_cpus(),
        load_before
    );
    println!(
        "bench: modes {}",
        modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut bench = Bench::new(nodemesh, &oha, &tools, &opts, clk_tck)?;
    let results = match bench.measure_rounds(&modes) {
        Ok(r) => r,
        Err(e) => {
            // Collect the logs before the work directory goes with `bench`.
            let logs = bench.logs();
            drop(bench);
            return Err(anyhow::anyhow!("{e:#}\n\nbench failed; logs:\n{logs}"));
        }
    };
    drop(bench);
    println!("bench: topology removed");

    let comparison = comparison(&results);
    println!();
    print!("{}", comparison.main.render());
    println!(
        "\nEvery path as a ratio of (or delta to) the direct run of the same invocation. L4: \
         to the server pod's\naddress, relayed as opaque TCP by the client's agent (the server's agent serves \
         HTTP ports as HTTP). L7: to the \
         Service, routed by the client-side agent\n(VirtualService, {} routes, the last \
         matching). + mTLS: the agents reach each other over mutual TLS (HBONE),\nas by \
         default; plaintext hop: under a mesh-wide PeerAuthentication DISABLE. HAProxy pair: \
         L7\nwith mutual TLS between two HAProxies ({} threads each, as the agents' 2 \
         workers), and bulk TCP in\ntheir `mode tcp`, also over mutual TLS. Proxy CPU sums \
         both proxies of the path. Targets \
         are the design's for L7 + mTLS through two agents, judged here on {} (informative \
         only).\np99 on shared VMs is dominated by hypervisor steal: judge by p50/p90 and CPU.",
        ROUTE_COUNTS[0],
        haproxy::THREADS,
        comparison.judged.label()
    );
    println!("\nnodemesh against the HAProxy pair (same invocation):");
    print!("{}", comparison.versus_haproxy.render());
    let route_rows = l7_table(
        &results,
        ROUTE_COUNTS.map(|n| format!("{n} routes")),
        &|r, i| r.l7_with(ROUTE_COUNTS[i]),
    );
    println!("\nRoute-table size, meshed L7, requests matching the last route:");
    print!("{}", route_rows.render());
    println!(
        "The CPU differences (ms per 1000 requests = µs per request) are the per-request cost \
         of the larger\ntable. Design: the same with 10 and with 10 000 routes."
    );
    let allow_rows = l7_table(
        &results,
        authz::ALLOW_LISTS.map(|n| format!("{n} allow rules")),
        &|r, i| r.l7_variant(Variant::AllowList(authz::ALLOW_LISTS[i])),
    );
    println!(
        "\nAllow-list size, meshed L7 + mTLS ({} routes), AuthorizationPolicy on the server, the \
         client matching the last rule:",
        ROUTE_COUNTS[0]
    );
    print!("{}", allow_rows.render());
    println!("Design: no measurable difference between 10 and 1 000 rules.");
    for setting in telemetry::SETTINGS {
        let rows = l7_table(
            &results,
            ["default".into(), setting.label().into()],
            &|r, i| match i {
                0 => r.l7_with(ROUTE_COUNTS[0]),
                _ => r.l7_variant(Variant::Telemetry(setting)),
            },
        );
        println!(
            "\nTelemetry, meshed L7 + mTLS ({} routes), default (metrics on, tracing 1 %) against a \
             mesh-wide Telemetry resource, {}:",
            ROUTE_COUNTS[0],
            setting.label()
        );
        print!("{}", rows.render());
    }
    println!("Target: metrics on cost at most 10 % more agent CPU than metrics off.");
    let ingress_rows = l7_table(
        &results,
        [Variant::FromOutside.label(), Variant::Ingress.label()],
        &|r, i| r.l7_variant([Variant::FromOutside, Variant::Ingress][i]),
    );
    println!(
        "\nIngress: a client outside the mesh, straight to the server pod (direct mode) against \
         through node-a's\nIstio Gateway (port {}), routed by a VirtualService bound to it and \
         forwarded over mutual TLS as the\ningress's identity to node-b's agent and nginx:",
        ingress::PORT
    );
    print!("{}", ingress_rows.render());
    let http2_rows = l7_table(
        &results,
        [Variant::Http2Direct.label(), Variant::Http2.label()],
        &|r, i| r.l7_variant([Variant::Http2Direct, Variant::Http2][i]),
    );
    println!(
        "\nHTTP/2 with prior knowledge (h2c, as gRPC runs in a mesh), {CONNECTIONS} connections \
         × {HTTP2_STREAMS} streams: straight\nto nginx's HTTP/2 port (direct mode) against to the \
         Service's `http2` port, routed by node-a's agent ({} routes)\nand carried over mutual \
         TLS, in HTTP/2 on every hop (new connections: one request each, in HTTP/2):",
        ROUTE_COUNTS[0]
    );
    print!("{}", http2_rows.render());
    let warnings: Vec<&String> = results.iter().flat_map(|r| &r.warnings).collect();
    if warnings.is_empty() {
        println!(
            "No phase saw other work above {INTERFERENCE_CPUS} CPU or steal above {STEAL_CPUS} CPU."
        );
    }
    for w in warnings {
        println!("warning: {w}");
    }
    if opts.rounds > 1 {
        println!("Figures are medians of {} rounds.", opts.rounds);
    } else {
        println!(
            "One round: direct req/s varies by up to ±20 % between runs on shared 2-vCPU VMs; \
             use --rounds 3 (medians) before drawing conclusions."
        );
    }
    print!("{}", cpu_breakdown(&results));

    let mut doc = json!({
        "settings": {
            "duration_seconds": opts.duration.as_secs_f64(),
            "rounds": opts.rounds,
            "bulk_seconds": opts.bulk.as_secs_f64(),
            "connections": CONNECTIONS,
            "fixed_rate": FIXED_RATE,
            "body_bytes": BODY_SIZE,
            "route_counts": ROUTE_COUNTS,
            "haproxy_threads": haproxy::THREADS,
            "oha": oha.version,
            "cpus": num_cpus(),
            "load_average_before": load_before,
            "clock_ticks_per_second": clk_tck,
        },
        "comparison": comparison.main.to_json(),
        "targets_judged_on": comparison.judged.label(),
        "versus_haproxy_pair": comparison.versus_haproxy.to_json(),
        "route_count_cost": route_rows.to_json(),
        "allow_list_cost": allow_rows.to_json(),
        "ingress_cost": ingress_rows.to_json(),
        "http2_cost": http2_rows.to_json(),
    });
    for mode in modes {
        doc[mode.key()] = results
            .iter()
            .filter(|r| r.mode == mode)
            .map(ModeResult::to_json)
            .collect();
    }
    let out = &opts.results;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nbench: results written to {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------- options

struct Options {
    /// Length of each oha phase.
    duration: Duration,
    /// Length of the iperf3 run.
    bulk: Duration,
    /// Direct + meshed rounds; the table shows medians.
    rounds: usize,
    /// Only the headline L7 + mTLS path against direct (`focus.rs`).
    focus: bool,
    /// With `focus`: more agent binaries to compare against.
    against: Vec<PathBuf>,
    /// With `focus`: count allocations (`counters.rs`).
    allocations: bool,
    /// With `focus`: the L7 phases' HTTP version.
    version: HttpVersion,
    /// Where the full run's results go.
    results: PathBuf,
}

impl Options {
    /// `None` for `--help`.
    fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut duration = Duration::from_secs(10);
        let mut rounds = 1;
        let mut focus = false;
        let mut against = Vec::new();
        let mut allocations = false;
        let mut version = HttpVersion::Http1;
        let mut results = super::target_dir().join("bench/results.json");
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => duration = Duration::from_secs(3),
                "--duration" => {
                    let v = it.next().context("--duration needs a value, e.g. 10s")?;
                    duration = parse_duration(v)?;
                }
                "--rounds" => {
                    let v = it.next().context("--rounds needs a number")?;
                    rounds = parse_rounds(v)?;
                }
                "--focus" => focus = true,
                "--allocations" => allocations = true,
                "--http2" => version = HttpVersion::Http2,
                "--results" => {
                    results = PathBuf::from(it.next().context("--results needs a file")?);
                }
                "--against" => {
                    let v = it.next().context("--against needs an agent binary")?;
                    against.push(PathBuf::from(v));
                }
                "-h" | "--help" => return Ok(None),
                other => {
                    if let Some(v) = other.strip_prefix("--duration=") {
                        duration = parse_duration(v)?;
                    } else if let Some(v) = other.strip_prefix("--rounds=") {
                        rounds = parse_rounds(v)?;
                    } else {
                        eprint!("{USAGE}");
                        bail!("unknown bench argument {other:?}");
                    }
                }
            }
        }
        if duration < Duration::from_secs(1) {
            bail!("--duration must be at least 1s");
        }
        if !against.is_empty() && !focus {
            bail!("--against compares builds in --focus mode only");
        }
        if allocations && !focus {
            bail!("--allocations counts in --focus mode only");
        }
        if version == HttpVersion::Http2 && !focus {
            bail!("--http2 is for --focus: the full bench always has its HTTP/2 table");
        }
        Ok(Some(Options {
            duration,
            bulk: duration.min(BULK_MAX),
            rounds,
            focus,
            against,
            allocations,
            version,
            results,
        }))
    }
}

fn parse_rounds(s: &str) -> Result<usize> {
    match s.parse::<usize>() {
        Ok(n) if (1..=20).contains(&n) => Ok(n),
        _ => bail!("bad --rounds {s:?}: use a number from 1 to 20"),
    }
}

/// `10s`, `1500ms`, `2m`, or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || format!("bad duration {s:?}: use e.g. 10s, 1500ms or 1m");
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().with_context(bad)?;
    if !v.is_finite() || v <= 0.0 || v * scale > 24.0 * 3600.0 {
        bail!(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

// ---------------------------------------------------------------- tools

fn find_program(name: &str, fallbacks: &[&str]) -> Result<PathBuf> {
    if let Some(p) = super::find_tool(name) {
        return Ok(p);
    }
    fallbacks
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found: `cargo xtask setup` installs it (Debian package {name})")
        })
}

/// Drops the proxies' binaries from the page cache, so that each is read
/// back as a node reads a binary it starts: a page-cache folio is mapped
/// whole on a fault, and a file just written by a linker or by BOLT is held
/// in folios of up to 2 MB, not in those its readahead makes. Without this,
/// RSS measured right after a build depends on the tool that wrote the file
/// (1.4 MB more for a linker's output here, 7.9 MB for BOLT's).
fn read_back_from_disk(binaries: &[&Path]) -> Result<()> {
    for binary in binaries {
        // `sync` writes the file's dirty pages, which no advice drops;
        // `dd iflag=nocache count=0` then advises the kernel to drop all of it.
        super::status(std::process::Command::new("sync").arg(binary))?;
        super::status(
            std::process::Command::new("dd")
                .arg(format!("if={}", binary.display()))
                .args(["iflag=nocache", "count=0", "status=none"]),
        )
        .with_context(|| format!("dropping {} from the page cache", binary.display()))?;
    }
    Ok(())
}

/// The installed oha and the flags its version understands.
struct Oha {
    path: PathBuf,
    version: String,
    /// `--output-format json` (oha ≥ 1.5) or `-j` (older).
    json_args: Vec<&'static str>,
    /// `-w`: wait for requests in flight at the deadline instead of
    /// aborting them.
    wait_flag: Option<&'static str>,
}

impl Oha {
    fn find_or_install() -> Result<Oha> {
        let path = match super::find_tool("oha") {
            Some(p) => p,
            None => {
                println!(
                    "bench: installing the load generator: cargo install oha --locked \
                     (takes a few minutes, once)"
                );
                super::status(super::cargo().args(["install", "oha", "--locked"]))?;
                super::find_tool("oha").context("`cargo install oha` did not install oha")?
            }
        };
        let help = super::output_ok(std::process::Command::new(&path).arg("--help"))
            .with_context(|| format!("`{} --help` failed", path.display()))?;
        let version = super::output_ok(std::process::Command::new(&path).arg("--version"))
            .map(|v| v.trim().trim_start_matches("oha").trim().to_string())
            .unwrap_or_else(|| "?".into());
        let json_args = if help.contains("--output-format") {
            vec!["--output-format", "json"]
        } else if help.contains("--json") || help.contains("-j,") {
            vec!["-j"]
        } else {
            bail!(
                "{} supports neither --output-format json nor -j",
                path.display()
            );
        };
        let wait_flag = if help.contains("--wait-ongoing-requests-after-deadline") {
            Some("--wait-ongoing-requests-after-deadline")
        } else {
            None
        };
        for flag in ["--no-tui", "--disable-keepalive", "-q ", "-z "] {
            if !help.contains(flag.trim_end()) {
                bail!("{} does not understand {flag}", path.display());
            }
        }
        Ok(Oha {
            path,
            version,
            json_args,
            wait_flag,
        })
    }
}

// ---------------------------------------------------------------- the bench

struct Bench<'a> {
    // Field order is drop order: the agents stop and uninstall their eBPF
    // programs before the topology deletes the namespaces they run in.
    agents: Vec<Agent>,
    haproxy: HaproxyPair,
    otlp: otlp::Receiver,
    topo: Topology,
    oha: &'a Oha,
    iperf3: PathBuf,
    opts: &'a Options,
    config_dir: PathBuf,
    client_netns: String,
    /// A host on the inter-node fabric, outside the mesh: the ingress
    /// phases' client.
    outside_netns: String,
    server_ip: String,
    nginx_pid: u32,
    iperf3_server_pid: u32,
    clk_tck: u64,
    /// The configuration last written: the namespace labelled, the size
    /// of the route table, and the mesh-wide PeerAuthentication `DISABLE`.
    enrolled: bool,
    routes: usize,
    plaintext_hop: bool,
}

/// What a mode's phases leave behind besides their figures.
struct PhaseLog {
    mode: Mode,
    /// (started, total), for the `[n/total]` progress lines.
    steps: (usize, usize),
    warnings: Vec<String>,
    /// The mode's proxies' memory after each phase.
    memory_trace: Vec<(String, [Memory; 2])>,
}

impl PhaseLog {
    fn step(&mut self, what: &str) {
        self.steps.0 += 1;
        println!("  [{}/{}] {what}", self.steps.0, self.steps.1);
    }
}

impl<'a> Bench<'a> {
    fn new(
        nodemesh: &Path,
        oha: &'a Oha,
        tools: &Tools,
        opts: &'a Options,
        clk_tck: u64,
    ) -> Result<Bench<'a>> {
        read_back_from_disk(&[nodemesh, &tools.haproxy])?;
        // Locals drop in reverse order: on an error below, agents already
        // started stop before `topo` goes.
        let mut topo = Topology::new()?;
        println!(
            "bench: building the topology ({}): node-a + pod {CLIENT}, node-b + pod {SERVER}",
            topo.prefix()
        );
        topo.add_node("node-a")?;
        topo.add_node("node-b")?;
        let client = topo.add_pod("node-a", CLIENT)?;
        let server = topo.add_pod("node-b", SERVER)?;
        let outside_netns = topo.add_host("outside", ingress::OUTSIDE_INDEX)?;
        // The outside client reaches the server pod directly through its
        // node, the ingress path's last hop.
        let server_route = format!("{}/32", server.address);
        let node_b = topo.node("node-b").address.to_string();
        topo.run_in_ok(
            &outside_netns,
            &["ip", "route", "add", &server_route, "via", &node_b],
        )
        .context("routing the outside host to the server pod")?;
        for ns in [
            topo.node("node-a").netns.clone(),
            topo.node("node-b").netns.clone(),
            client.netns.clone(),
            server.netns.clone(),
            outside_netns.clone(),
        ] {
            topo.run_in_ok(
                &ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=10000 65000",
                ],
            )
            .with_context(|| format!("tuning TCP in {ns}"))?;
        }

        let nginx_pid = start_nginx(&mut topo, &tools.nginx, &server.netns)?;
        let iperf3_s = tools.iperf3.to_string_lossy().into_owned();
        let port = IPERF_PORT.to_string();
        let iperf3_server_pid = topo.spawn_in(
            &server.netns,
            &[&iperf3_s, "-s", "-p", &port],
            "iperf3-server",
        )?;
        wait_listening(&topo, &server.netns, IPERF_PORT)?;
        println!(
            "bench: starting the HAProxy pair ({} threads each, mutual TLS between them)",
            haproxy::THREADS
        );
        let haproxy = HaproxyPair::start(
            &mut topo,
            &tools.haproxy,
            (server.address, HTTP_PORT),
            (server.address, IPERF_PORT),
            routes::PATH,
        )?;

        let config_dir = topo.work_dir().join("config");
        write_config(&topo, &config_dir, false)?;
        write_routes(&config_dir, ROUTE_COUNTS[0])?;
        mtls::write_policy(&config_dir, false)?;
        // Tracing as Istio ships it: spans of 1 % of requests, to a real
        // OTLP receiver in node-a's namespace.
        let node_a = topo.node("node-a").clone();
        let otlp = otlp::Receiver::start(&mut topo, &node_a.netns)?;
        let endpoint = format!("http://{}:{}", node_a.address, otlp::PORT);
        let tracing = ["--otlp-endpoint", endpoint.as_str()];
        println!(
            "bench: starting one agent per node, with the test bed's mesh CA, tracing to {endpoint}"
        );
        let a = Agent::start_with(&mut topo, "node-a", &config_dir, nodemesh, &tracing)?;
        let b = Agent::start_with(&mut topo, "node-b", &config_dir, nodemesh, &tracing)?;
        let bench = Bench {
            agents: vec![a, b],
            haproxy,
            otlp,
            topo,
            oha,
            iperf3: tools.iperf3.clone(),
            opts,
            config_dir,
            client_netns: client.netns.clone(),
            outside_netns,
            server_ip: server.address.to_string(),
            nginx_pid,
            iperf3_server_pid,
            clk_tck,
            enrolled: false,
            routes: ROUTE_COUNTS[0],
            plaintext_hop: false,
        };
        bench.wait_config(&[0, 0])?;
        Ok(bench)
    }

    /// `rounds` times: every phase of every mode in `modes`, in order.
    fn measure_rounds(&mut self, modes: &[Mode]) -> Result<Vec<ModeResult>> {
        let mut results = Vec::new();
        for round in 1..=self.opts.rounds {
            if round > 1 {
                println!("\n######## round {round} of {}", self.opts.rounds);
            }
            for &mode in modes {
                if self.routes != ROUTE_COUNTS[0] {
                    self.set_routes(ROUTE_COUNTS[0])?;
                }
                if self.enrolled != mode.enrolls() {
                    self.set_enrolled(mode.enrolls())?;
                }
                let plaintext_hop = mode == Mode::MeshedPlaintext;
                if self.plaintext_hop != plaintext_hop {
                    self.set_plaintext_hop(plaintext_hop)?;
                }
                results.push(self.measure(mode)?);
            }
        }
        Ok(results)
    }

    fn set_enrolled(&mut self, enrolled: bool) -> Result<()> {
        let generations = self.generations()?;
        write_config(&self.topo, &self.config_dir, enrolled)?;
        self.enrolled = enrolled;
        self.wait_config(&generations)?;
        if enrolled {
            let netns = [
                self.topo.node("node-a").netns.as_str(),
                self.topo.node("node-b").netns.as_str(),
            ];
            mtls::wait_ready(&self.topo, &self.agents, &netns)?;
        }
        Ok(())
    }

    /// Writes or removes the mesh-wide PeerAuthentication `DISABLE`.
    fn set_plaintext_hop(&mut self, plaintext_hop: bool) -> Result<()> {
        let generations = self.generations()?;
        mtls::write_policy(&self.config_dir, plaintext_hop)?;
        self.plaintext_hop = plaintext_hop;
        self.wait_config(&generations)?;
        Ok(())
    }

    /// Returns how long the agents took to serve the new routes.
    fn set_routes(&mut self, routes: usize) -> Result<Duration> {
        let generations = self.generations()?;
        let start = Instant::now();
        write_routes(&self.config_dir, routes)?;
        self.routes = routes;
        self.wait_config(&generations)?;
        Ok(start.elapsed())
    }

    /// Each agent's config generation.
    fn generations(&self) -> Result<Vec<u64>> {
        self.agents
            .iter()
            .map(|a| {
                Ok(a.status_json()?["config"]["generation"]
                    .as_u64()
                    .unwrap_or(0))
            })
            .collect()
    }

    /// Waits until each agent has loaded a generation newer than its `after`
    /// that holds the config of `self.enrolled` and `self.routes`: both
    /// workloads known and enrolled (meshed) or not (direct), the Service,
    /// and its routes. A rejected config fails at once rather than at the
    /// timeout.
    fn wait_config(&self, after: &[u64]) -> Result<()> {
        let want_enrolled = u64::from(self.enrolled);
        let want_routes = self.routes as u64;
        let deadline = Instant::now() + CONFIG_TIMEOUT;
        for (agent, &after) in self.agents.iter().zip(after) {
            loop {
                let status = agent.status_json()?;
                let config = &status["config"];
                if let Some(error) = config["last_error"].as_str() {
                    bail!("the agent on {} rejected the config: {error}", agent.node());
                }
                let ready = config["generation"].as_u64() > Some(after)
                    && config["workloads"].as_u64() == Some(2)
                    && config["services"].as_u64() == Some(1)
                    && config["http_routes"].as_u64() == Some(want_routes)
                    && status["workloads"]["on_node"].as_u64() == Some(1)
                    && status["workloads"]["enrolled"].as_u64() == Some(want_enrolled);
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the agent on {} did not reach the configuration ({want_enrolled} \
                         workload enrolled, {want_routes} HTTP routes) within \
                         {CONFIG_TIMEOUT:?}: {status:#}\nagent log:\n{}",
                        agent.node(),
                        tail(&agent.log(), 40)
                    );
                }
                std::thread::sleep(CONFIG_POLL);
            }
        }
        Ok(())
    }

    fn measure(&mut self, mode: Mode) -> Result<ModeResult> {
        println!("\n== {} ==", mode.name().to_uppercase());
        let (url, path) = match mode {
            Mode::Direct => (self.pod_url(), "pod IP".to_string()),
            Mode::HaproxyPair => {
                self.haproxy
                    .check(&self.topo, &self.client_netns, BODY_SIZE)?;
                println!(
                    "  a request through the pair reaches nginx over TLS 1.3 with HAProxy A's \
                     certificate; B refuses a client without one"
                );
                (self.haproxy.url.clone(), "HAProxy pair".to_string())
            }
            Mode::MeshedMtls => (self.pod_url(), "L4 + mTLS, pod IP".to_string()),
            Mode::MeshedPlaintext => {
                let routes = ROUTE_COUNTS[0];
                let url = self.service_url();
                routes::check_response(&self.topo, &self.client_netns, &url, routes, BODY_SIZE)?;
                (url, format!("L7 plaintext hop, {routes} routes"))
            }
        };
        if mode.enrolls() {
            until_config_applied(|| mtls::check_hop(&self.topo, &self.client_netns, &url, mode))?;
            println!("  {url} reaches nginx over the hop of {}", mode.name());
        }
        let counts_before = self.agent_counts()?;
        // The route tables and the outside client on the default path only.
        let full = matches!(mode, Mode::Direct | Mode::MeshedMtls);
        let bulk_steps = usize::from(self.bulk_target(mode).is_some());
        // The outside client's phases (direct to the pod, or the ingress),
        // and HTTP/2's.
        let outside_steps = 6 * usize::from(full);
        let l7_steps = if mode == Mode::MeshedMtls {
            3 * (ROUTE_COUNTS.len() + authz::ALLOW_LISTS.len() + telemetry::SETTINGS.len())
        } else {
            0
        };
        // Open connections held: on the main path, and on L7 + mTLS's.
        let held_steps = match mode {
            Mode::HaproxyPair => 1,
            Mode::MeshedMtls => 2,
            Mode::Direct | Mode::MeshedPlaintext => 0,
        };
        let mut log = PhaseLog {
            mode,
            steps: (0, 3 + bulk_steps + outside_steps + l7_steps + held_steps),
            warnings: Vec::new(),
            memory_trace: vec![("start".into(), self.proxy_memory(mode)?)],
        };

        let tls_before = self.haproxy_tls_connections(mode)?;
        self.warm_up(&self.client_netns, &url)?;
        let mut main = self.path_phases(
            &mut log,
            &self.client_netns,
            &url,
            &path,
            HttpVersion::Http1,
        )?;
        let haproxy_tls_connections = match (tls_before, self.haproxy_tls_connections(mode)?) {
            (Some(before), Some(after)) => {
                let n = after.saturating_sub(before);
                println!(
                    "        HAProxy B accepted {n} TLS connections from A, for {} new client \
                     connections",
                    3 * CONNECTIONS as u64 + main.conn_rate.attempted()
                );
                Some(n)
            }
            _ => None,
        };

        let bulk = match self.bulk_target(mode) {
            None => None,
            Some(to) => {
                let tls_before = self.haproxy_tls_connections(mode)?;
                let bulk = self.bulk_phase(&mut log, "bulk TCP", "bulk", &to)?;
                // iperf3's control and data connections: A opens a TLS
                // connection to B for each.
                if let (Some(before), Some(after)) =
                    (tls_before, self.haproxy_tls_connections(mode)?)
                {
                    let n = after.saturating_sub(before);
                    if n < 2 {
                        bail!(
                            "bulk TCP through the HAProxy pair did not reach B over TLS: B \
                             accepted {n} TLS connections for iperf3's two\n{}",
                            self.haproxy.logs(&self.topo)
                        );
                    }
                }
                Some(bulk)
            }
        };

        let mut l7 = Vec::new();
        if mode == Mode::MeshedMtls {
            for routes in ROUTE_COUNTS {
                l7.push(self.l7_phases(&mut log, routes)?);
            }
            self.set_routes(ROUTE_COUNTS[0])?;
            for rules in authz::ALLOW_LISTS {
                l7.push(self.allow_list_phases(&mut log, rules)?);
            }
            self.set_allow_list(None)?;
            for setting in telemetry::SETTINGS {
                l7.push(self.telemetry_phases(&mut log, setting)?);
            }
            self.set_config_file(telemetry::FILE, None)?;
            l7.push(self.ingress_phases(&mut log)?);
        }
        if mode == Mode::Direct {
            l7.push(self.outside_direct_phases(&mut log)?);
        }
        if full {
            l7.push(self.http2_phases(&mut log)?);
        }
        // Last: what 1000 connections leave behind goes back to the system
        // only over seconds, and would show in later phases' RSS.
        if held_steps > 0 {
            main.held = Some(self.held_phase(&mut log, &self.client_netns, &url, &path)?);
        }
        if mode == Mode::MeshedMtls {
            let routes = ROUTE_COUNTS[0];
            let first = (l7.iter_mut())
                .find(|r| r.variant == Variant::Default && r.routes == routes)
                .expect("the first route table's phases ran");
            let label = format!("L7, {routes} routes");
            let url = self.service_url();
            first.path.held = Some(self.held_phase(&mut log, &self.client_netns, &url, &label)?);
        }

        let counts_after = self.agent_counts()?;
        let captured = Captured {
            outbound_a: counts_after[0].0.saturating_sub(counts_before[0].0),
            inbound_b: counts_after[1].1.saturating_sub(counts_before[1].1),
            failed: (counts_after[0].2 + counts_after[1].2)
                .saturating_sub(counts_before[0].2 + counts_before[1].2),
        };
        if !mode.enrolls() && captured.outbound_a + captured.inbound_b > 0 {
            bail!(
                "the {} run went through the agents ({} outbound on node-a, {} inbound on \
                 node-b): the un-labelled namespace was captured",
                mode.name(),
                captured.outbound_a,
                captured.inbound_b
            );
        }
        // At least the 16 keep-alive connections of each oha run on node-a.
        // On node-b, as many inbound connections (HBONE streams on the mTLS
        // hop) on the L4 path; the L7-only mode's arrive from node-a's
        // upstream pool, which opens at least one per hop.
        let min_inbound = match mode {
            Mode::MeshedPlaintext => 1,
            _ => u64::from(CONNECTIONS),
        };
        if mode.enrolls()
            && (captured.outbound_a < u64::from(CONNECTIONS) || captured.inbound_b < min_inbound)
        {
            bail!(
                "the {} run did not go through both agents ({} outbound on node-a, {} inbound \
                 on node-b)",
                mode.name(),
                captured.outbound_a,
                captured.inbound_b
            );
        }
        if mode.enrolls() {
            println!(
                "        agents proxied {} outbound (node-a) / {} inbound (node-b) connections, {} failed",
                captured.outbound_a, captured.inbound_b, captured.failed
            );
            if captured.failed > 0 {
                for failure in self.recent_failures()?.iter().take(5) {
                    println!("          {failure}");
                }
            }
        }
        Ok(ModeResult {
            mode,
            main,
            l7,
            bulk,
            warnings: log.warnings,
            memory_trace: log.memory_trace,
            captured,
            haproxy_tls_connections,
        })
    }

    /// Where `mode` sends bulk TCP: the server pod's iperf3 (directly or
    /// relayed by the agents), or HAProxy A's TCP front; none on the L7-only
    /// plaintext hop.
    fn bulk_target(&self, mode: Mode) -> Option<(String, u16)> {
        match mode {
            Mode::Direct | Mode::MeshedMtls => Some(self.pod_iperf3()),
            Mode::HaproxyPair => {
                let (ip, port) = self.haproxy.bulk_front;
                Some((ip.to_string(), port))
            }
            Mode::MeshedPlaintext => None,
        }
    }

    /// The server pod's iperf3 server.
    fn pod_iperf3(&self) -> (String, u16) {
        (self.server_ip.clone(), IPERF_PORT)
    }

    /// The server pod's address: the only one reachable without the mesh.
    fn pod_url(&self) -> String {
        self.pod_url_in(HttpVersion::Http1)
    }

    /// nginx's port for `version` on the server pod's address.
    fn pod_url_in(&self, version: HttpVersion) -> String {
        let port = match version {
            HttpVersion::Http1 => HTTP_PORT,
            HttpVersion::Http2 => HTTP2_PORT,
        };
        format!("http://{}:{port}{}", self.server_ip, routes::PATH)
    }

    /// The Service's address: routed by the client-side agent's L7 proxy.
    fn service_url(&self) -> String {
        self.service_url_in(HttpVersion::Http1)
    }

    /// The Service's port for `version` (`http` or `http2`).
    fn service_url_in(&self, version: HttpVersion) -> String {
        let port = match version {
            HttpVersion::Http1 => SERVICE_PORT,
            HttpVersion::Http2 => SERVICE_HTTP2_PORT,
        };
        format!("http://{SERVICE_IP}:{port}{}", routes::PATH)
    }

    /// The HTTP phases through the client-side agent's L7 proxy, with a
    /// VirtualService of `routes` routes of which requests match the last.
    fn l7_phases(&mut self, log: &mut PhaseLog, routes: usize) -> Result<L7Result> {
        let applied_after = self.set_routes(routes)?;
        let url = self.service_url();
        routes::check_response(&self.topo, &self.client_netns, &url, routes, BODY_SIZE)?;
        mtls::check_hop(&self.topo, &self.client_netns, &url, log.mode)?;
        println!(
            "  VirtualService with {routes} routes served {:.0} ms after the write; \
             a request takes the last route",
            applied_after.as_secs_f64() * 1000.0
        );
        let from = &self.client_netns;
        self.warm_up(from, &url)?;
        let label = format!("L7, {routes} routes");
        let path = self.path_phases(log, from, &url, &label, HttpVersion::Http1)?;
        // Last: the listing's own allocations must not count as the table's.
        let listing =
            routes::check_table(&self.agents[0], &format!("{NAMESPACE}/{SERVER}"), routes)?;
        println!(
            "        `nodemesh routes` lists the {routes} routes ({:.1} MB of JSON)",
            listing as f64 / 1e6
        );
        Ok(L7Result {
            routes,
            variant: Variant::Default,
            path,
            applied_after,
        })
    }

    /// Writes (or, `None`, removes) the allow-list of `rules` rules;
    /// returns how long the agents took to serve it.
    fn set_allow_list(&mut self, rules: Option<usize>) -> Result<Duration> {
        let yaml = rules.map(|rules| authz::allow_list(NAMESPACE, SERVER, rules));
        self.set_config_file(authz::FILE, yaml.as_deref())
    }

    /// Writes `yaml` to the config file `file` (or, `None`, removes it);
    /// returns how long the agents took to serve the change.
    fn set_config_file(&mut self, file: &str, yaml: Option<&str>) -> Result<Duration> {
        let generations = self.generations()?;
        let start = Instant::now();
        match yaml {
            Some(yaml) => config::write_raw(&self.config_dir, file, yaml)?,
            None => config::remove(&self.config_dir, file)?,
        }
        self.wait_config(&generations)?;
        Ok(start.elapsed())
    }

    /// The L7 phases (10 routes) under the mesh-wide telemetry `setting`,
    /// once the bench has checked that the agents apply it.
    fn telemetry_phases(
        &mut self,
        log: &mut PhaseLog,
        setting: telemetry::Setting,
    ) -> Result<L7Result> {
        let applied_after = self.set_config_file(telemetry::FILE, Some(&setting.yaml()))?;
        let url = self.service_url();
        let routes = ROUTE_COUNTS[0];
        let observe = |bench: &Self| -> Result<u64> {
            match setting {
                telemetry::Setting::MetricsOff => {
                    telemetry::requests_reported(&bench.topo, &bench.agents)
                }
                telemetry::Setting::TraceAll => Ok(bench.otlp.spans()?.len() as u64),
            }
        };
        let before = observe(self)?;
        for _ in 0..telemetry::CHECK_REQUESTS {
            routes::check_response(&self.topo, &self.client_netns, &url, routes, BODY_SIZE)?;
        }
        let deadline = Instant::now() + telemetry::CHECK_TIMEOUT;
        let mut after = observe(self)?;
        while !setting.applied(before, after) && Instant::now() < deadline {
            std::thread::sleep(CONFIG_POLL * 10);
            after = observe(self)?;
        }
        if let Err(failed) = setting.check(before, after) {
            match setting {
                telemetry::Setting::TraceAll => {
                    let counters = telemetry::trace_counters(&self.topo, &self.agents);
                    bail!("{failed:#}; the agents' span counters: {counters}")
                }
                telemetry::Setting::MetricsOff => return Err(failed),
            }
        }
        println!(
            "  Telemetry `{}` served {:.0} ms after the write, and applied",
            setting.label(),
            applied_after.as_secs_f64() * 1000.0
        );
        let from = &self.client_netns;
        self.warm_up(from, &url)?;
        let label = format!("L7, {}", setting.label());
        let path = self.path_phases(log, from, &url, &label, HttpVersion::Http1)?;
        Ok(L7Result {
            routes,
            variant: Variant::Telemetry(setting),
            path,
            applied_after,
        })
    }

    /// The outside client's phases through node-a's ingress Gateway, into
    /// the mesh over mutual TLS to the server on node-b.
    fn ingress_phases(&mut self, log: &mut PhaseLog) -> Result<L7Result> {
        let yaml = ingress::gateway(NAMESPACE, SERVER);
        let written = Instant::now();
        self.set_config_file(ingress::FILE, Some(&yaml))?;
        let node_a = self.topo.node("node-a").address;
        let url = format!("http://{node_a}:{}{}", ingress::PORT, routes::PATH);
        let from = self.outside_netns.clone();
        // The listener follows the config once the agent reconciles.
        until_config_applied(|| ingress::check_response(&self.topo, &from, &url, BODY_SIZE))?;
        let applied_after = written.elapsed();
        println!(
            "  Gateway on port {} served {:.0} ms after the write; an outside request reaches \
             nginx over mutual TLS as the ingress",
            ingress::PORT,
            applied_after.as_secs_f64() * 1000.0
        );
        self.warm_up(&from, &url)?;
        let path = self.path_phases(
            log,
            &from,
            &url,
            "outside client, ingress",
            HttpVersion::Http1,
        )?;
        self.set_config_file(ingress::FILE, None)?;
        Ok(L7Result {
            routes: 1,
            variant: Variant::Ingress,
            path,
            applied_after,
        })
    }

    /// Direct mode: the outside client's phases straight to the server pod,
    /// the reference of the ingress phases.
    fn outside_direct_phases(&self, log: &mut PhaseLog) -> Result<L7Result> {
        let url = self.pod_url();
        let from = &self.outside_netns;
        self.warm_up(from, &url)?;
        let path = self.path_phases(
            log,
            from,
            &url,
            "outside client, direct",
            HttpVersion::Http1,
        )?;
        Ok(L7Result {
            routes: 0,
            variant: Variant::FromOutside,
            path,
            applied_after: Duration::ZERO,
        })
    }

    /// Checks that an HTTP/2 request (prior knowledge) reaches nginx in
    /// HTTP/2 (so every hop spoke it: an agent keeps the client's
    /// protocol) and, meshed, through the last of the 10 routes and by the
    /// caller's SPIFFE id; returns the URL: nginx's HTTP/2 port in direct
    /// mode, the Service's `http2` port meshed.
    fn check_http2(&self, mode: Mode) -> Result<String> {
        let direct = mode == Mode::Direct;
        let url = if direct {
            self.pod_url_in(HttpVersion::Http2)
        } else {
            self.service_url_in(HttpVersion::Http2)
        };
        let probe = Probe::get_with(
            &self.topo,
            &self.client_netns,
            &url,
            &["--http2-prior-knowledge"],
        )?;
        let want = format!("200 {BODY_SIZE}");
        let protocol = probe.header(PROTOCOL_HEADER);
        if probe.summary != want || protocol.as_deref() != Some("HTTP/2.0") {
            bail!(
                "an HTTP/2 request to {url} got {:?} and nginx saw {protocol:?} (want {want:?} \
                 and HTTP/2.0); headers:\n{}",
                probe.summary,
                probe.headers
            );
        }
        if !direct {
            routes::check_last_route(&probe, &url, ROUTE_COUNTS[0], BODY_SIZE)?;
        }
        mtls::check_caller(&probe, &url, mode)?;
        println!(
            "  an HTTP/2 request to {url} reaches nginx in HTTP/2{}",
            if direct {
                ""
            } else {
                " through the last route, over mutual TLS"
            }
        );
        Ok(url)
    }

    /// HTTP/2 with prior knowledge, as gRPC runs in a mesh: direct to
    /// nginx's HTTP/2 port, or (meshed) to the Service's `http2` port,
    /// routed by the client-side agent with the 10 routes and carried over
    /// mutual TLS, after [`Self::check_http2`].
    fn http2_phases(&self, log: &mut PhaseLog) -> Result<L7Result> {
        let (variant, routes) = match log.mode {
            Mode::Direct => (Variant::Http2Direct, 0),
            _ => (Variant::Http2, ROUTE_COUNTS[0]),
        };
        let url = self.check_http2(log.mode)?;
        let from = &self.client_netns;
        self.warm_up_with(from, &url, HttpVersion::Http2)?;
        let path = self.path_phases(log, from, &url, &variant.label(), HttpVersion::Http2)?;
        Ok(L7Result {
            routes,
            variant,
            path,
            applied_after: Duration::ZERO,
        })
    }

    /// The L7 phases (10 routes) with an allow-list of `rules` rules on the
    /// server, the client matching the last.
    fn allow_list_phases(&mut self, log: &mut PhaseLog, rules: usize) -> Result<L7Result> {
        let written = Instant::now();
        self.set_allow_list(Some(rules))?;
        let server = format!("{NAMESPACE}/{SERVER}");
        until_config_applied(|| authz::check_policies(&self.agents[1], &server, rules))?;
        let applied_after = written.elapsed();
        let url = self.service_url();
        let routes = ROUTE_COUNTS[0];
        routes::check_response(&self.topo, &self.client_netns, &url, routes, BODY_SIZE)?;
        println!(
            "  allow-list of {rules} rules served {:.0} ms after the write; the client's \
             requests match its last rule",
            applied_after.as_secs_f64() * 1000.0
        );
        let from = &self.client_netns;
        self.warm_up(from, &url)?;
        let label = format!("L7, allow-list of {rules} rules");
        let path = self.path_phases(log, from, &url, &label, HttpVersion::Http1)?;
        Ok(L7Result {
            routes,
            variant: Variant::AllowList(rules),
            path,
            applied_after,
        })
    }

    /// The HTTP phases from `from` against `url`, then its connection
    /// rate; the proxies' memory after them.
    fn path_phases(
        &self,
        log: &mut PhaseLog,
        from: &str,
        url: &str,
        path: &str,
        version: HttpVersion,
    ) -> Result<PathResult> {
        let http = self.http_phases(log, from, url, path, version)?;
        let (conn_rate, conn_rate_cpu) = self.connection_rate(log, from, url, path, version)?;
        Ok(PathResult {
            version,
            http,
            conn_rate,
            conn_rate_cpu,
            memory: self.proxy_memory(log.mode)?,
            held: None,
        })
    }

    /// New connections per second from `from` to `url`, one request each,
    /// and the proxies' CPU meanwhile.
    fn connection_rate(
        &self,
        log: &mut PhaseLog,
        from: &str,
        url: &str,
        path: &str,
        version: HttpVersion,
    ) -> Result<(HttpRun, CpuUse)> {
        let d = human(self.opts.duration);
        log.step(&format!(
            "connection rate ({path}): a new connection per request, {CONNECTIONS} concurrent, {d}"
        ));
        let conns = CONNECTIONS.to_string();
        let phase = format!("connection rate ({path})");
        let args = version.oha_args(false, &["-c", &conns, "--disable-keepalive", "-z", &d, url]);
        let (run, cpu) = self.phase(log, &phase, |b| b.oha(from, &args, &phase))?;
        println!(
            "        {:.0} connections/s; proxies {:.1} ms CPU per 1000 connections",
            run.rps,
            per_1000(cpu.proxies_total(), run.ok)
        );
        Ok((run, cpu))
    }

    /// Max throughput, then latency at the fixed rate, against `url`.
    fn http_phases(
        &self,
        log: &mut PhaseLog,
        from: &str,
        url: &str,
        path: &str,
        version: HttpVersion,
    ) -> Result<HttpPhases> {
        let conns = CONNECTIONS.to_string();
        let d = human(self.opts.duration);
        let streams = version.streams_label();
        log.step(&format!(
            "{} max throughput ({path}): {CONNECTIONS} keep-alive connections{streams}, {d}",
            version.name()
        ));
        let phase = format!("max throughput ({path})");
        let args = version.oha_args(true, &["-c", &conns, "-z", &d, url]);
        let (throughput, throughput_cpu) =
            self.phase(log, &phase, |b| b.oha(from, &args, &phase))?;
        println!(
            "        {:.0} req/s, p50 {:.3} ms; proxies {:.1} ms CPU per 1000 req",
            throughput.rps,
            throughput.p50_ms,
            per_1000(throughput_cpu.proxies_total(), throughput.ok)
        );

        log.step(&format!(
            "latency ({path}) at {FIXED_RATE} req/s over {CONNECTIONS} connections, {d}"
        ));
        let rate = FIXED_RATE.to_string();
        let phase = format!("fixed rate ({path})");
        let args = version.oha_args(true, &["-c", &conns, "-q", &rate, "-z", &d, url]);
        let (latency, latency_cpu) = self.phase(log, &phase, |b| b.oha(from, &args, &phase))?;
        println!(
            "        {:.0} req/s, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
            latency.rps, latency.p50_ms, latency.p90_ms, latency.p99_ms
        );
        Ok(HttpPhases {
            throughput,
            throughput_cpu,
            latency,
            latency_cpu,
        })
    }

    /// Opens the keep-alive connections (and, meshed, the agents' upstream
    /// pools) before anything is measured.
    fn warm_up(&self, from: &str, url: &str) -> Result<()> {
        self.warm_up_with(from, url, HttpVersion::Http1)
    }

    fn warm_up_with(&self, from: &str, url: &str, version: HttpVersion) -> Result<()> {
        let (conns, duration) = (CONNECTIONS.to_string(), human(WARMUP));
        let args = version.oha_args(true, &["-c", &conns, "-z", &duration, url]);
        self.oha(from, &args, "warm-up")?;
        Ok(())
    }

    /// Runs `f` and returns its result with the CPU it cost; notes the
    /// mode's proxies' memory afterwards and whether other work skewed it.
    fn phase<T>(
        &self,
        log: &mut PhaseLog,
        name: &str,
        f: impl FnOnce(&Self) -> Result<T>,
    ) -> Result<(T, CpuUse)> {
        let before = self.cpu_snapshot(log.mode)?;
        let value = f(self)?;
        let cpu = self.cpu_since(&before, log.mode)?;
        log.memory_trace
            .push((name.to_string(), self.proxy_memory(log.mode)?));
        if let Some(w) = cpu.interference(&format!("{} {name}", log.mode.name())) {
            println!("  warning: {w}");
            log.warnings.push(w);
        }
        Ok((value, cpu))
    }

    /// Runs oha in the network namespace `from` (the client pod, or the
    /// outside host) and checks that (almost) every request succeeded.
    fn oha(&self, from: &str, args: &[&str], what: &str) -> Result<HttpRun> {
        self.check_processes()?;
        let oha = self.oha.path.to_string_lossy().into_owned();
        let mut cmd = vec![oha.as_str(), "--no-tui"];
        cmd.extend(self.oha.json_args.iter().copied());
        if let Some(w) = self.oha.wait_flag {
            cmd.push(w);
        }
        cmd.extend_from_slice(args);
        let out = self
            .topo
            .command_in(from, &cmd)?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot run `{}`", cmd.join(" ")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "{what}: `{}` failed ({}): {}",
                cmd.join(" "),
                out.status,
                stderr.trim()
            );
        }
        let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{what}: oha printed invalid JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let run = HttpRun::from_oha(&doc).with_context(|| format!("{what}: {doc}"))?;
        if run.error_fraction() > MAX_ERROR_FRACTION || run.ok == 0 {
            // A dead agent or backend is the likelier cause: say so first.
            self.check_processes()
                .with_context(|| format!("{what}: requests failed"))?;
            bail!(
                "{what}: {} of {} requests failed ({} non-2xx, errors {:?}; oha: `{}`)",
                run.non_2xx + run.errors,
                run.attempted(),
                run.non_2xx,
                run.error_kinds,
                cmd.join(" ")
            );
        }
        self.check_processes()?;
        Ok(run)
    }

    /// Bulk TCP, one iperf3 stream from the client pod to `to` (`what` in
    /// the log, `phase` in the phase's warnings and memory).
    fn bulk_phase(
        &self,
        log: &mut PhaseLog,
        what: &str,
        phase: &str,
        to: &(String, u16),
    ) -> Result<Bulk> {
        log.step(&format!("{what}: iperf3, {}", human(self.opts.bulk)));
        let (transfer, cpu) = self.phase(log, phase, |b| b.iperf3(to))?;
        println!("        {:.2} Gbit/s", transfer.bits_per_second / 1e9);
        Ok(Bulk { transfer, cpu })
    }

    /// Runs the iperf3 client in the client pod against `to`; returns what
    /// the server received.
    fn iperf3(&self, (host, port): &(String, u16)) -> Result<Transfer> {
        self.check_processes()?;
        let iperf3 = self.iperf3.to_string_lossy().into_owned();
        let port = port.to_string();
        let secs = format!("{}", self.opts.bulk.as_secs().max(1));
        let cmd = [iperf3.as_str(), "-c", host, "-p", &port, "-t", &secs, "-J"];
        let out = self.topo.run_in(&self.client_netns, &cmd)?;
        self.check_processes().context("bulk TCP")?;
        let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`{}` printed invalid JSON ({}): {} {}",
                cmd.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(err) = doc["error"].as_str() {
            bail!("`{}` failed: {err}", cmd.join(" "));
        }
        if !out.status.success() {
            bail!("`{}` failed ({})", cmd.join(" "), out.status);
        }
        let received = |field: &str| {
            doc["end"]["sum_received"][field]
                .as_f64()
                .with_context(|| format!("no end.sum_received.{field} in iperf3's JSON: {doc}"))
        };
        Ok(Transfer {
            bits_per_second: received("bits_per_second")?,
            bytes: received("bytes")?,
        })
    }

    fn check_processes(&self) -> Result<()> {
        for agent in &self.agents {
            if !agent.is_running() {
                bail!("the agent on {} has exited", agent.node());
            }
        }
        if !self.topo.is_running(self.nginx_pid) {
            bail!("nginx has exited");
        }
        for (pid, peer) in self.haproxy.pids.iter().zip(["A", "B"]) {
            if !self.topo.is_running(*pid) {
                bail!("HAProxy {peer} has exited");
            }
        }
        Ok(())
    }

    fn agent_pids(&self) -> Result<[u32; 2]> {
        let pid = |i: usize| -> Result<u32> {
            self.agents[i]
                .pid()
                .with_context(|| format!("the agent on {} is not running", self.agents[i].node()))
        };
        Ok([pid(0)?, pid(1)?])
    }

    /// Per agent: (outbound total, inbound total, failed in both directions).
    fn agent_counts(&self) -> Result<[(u64, u64, u64); 2]> {
        let mut out = [(0, 0, 0); 2];
        for (i, agent) in self.agents.iter().enumerate() {
            let s = agent.status_json()?;
            let c = &s["connections"];
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            out[i] = (
                n(&c["outbound"]["total"]),
                n(&c["inbound"]["total"]),
                n(&c["outbound"]["failed"]) + n(&c["inbound"]["failed"]),
            );
        }
        Ok(out)
    }

    /// Why recent proxied connections failed, from each agent's
    /// `nodemesh connections` (its last few hundred connections).
    fn recent_failures(&self) -> Result<Vec<String>> {
        // (node, direction, protocol, outcome) → count, over the records
        // each agent keeps: thousands of failures are usually a few kinds.
        let mut kinds = std::collections::BTreeMap::<String, u64>::new();
        for agent in &self.agents {
            let list = agent.cli(&["connections", "-o", "json"])?;
            let list: Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
            for c in list.as_array().into_iter().flatten() {
                if c["outcome"] != "ok" {
                    let kind = format!(
                        "{}: {} {} to {}: {}",
                        agent.node(),
                        c["direction"].as_str().unwrap_or("?"),
                        c["protocol"].as_str().unwrap_or("?"),
                        c["original_destination"].as_str().unwrap_or("?"),
                        c["outcome"].as_str().unwrap_or("?")
                    );
                    *kinds.entry(kind).or_default() += 1;
                }
            }
        }
        let mut kinds: Vec<(String, u64)> = kinds.into_iter().collect();
        kinds.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        Ok(kinds
            .into_iter()
            .map(|(kind, n)| format!("{n} × {kind}"))
            .collect())
    }

    /// On the HAProxy pair, the TLS connections B has accepted so far.
    fn haproxy_tls_connections(&self, mode: Mode) -> Result<Option<u64>> {
        if mode == Mode::HaproxyPair {
            self.haproxy.b_tls_connections().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The processes that carry `mode`'s requests, node-a's first: the
    /// agents, or the HAProxies. (Direct runs report the idle agents.)
    fn proxy_pids(&self, mode: Mode) -> Result<[u32; 2]> {
        match mode {
            Mode::HaproxyPair => Ok(self.haproxy.pids),
            _ => self.agent_pids(),
        }
    }

    fn proxy_memory(&self, mode: Mode) -> Result<[Memory; 2]> {
        let pids = self.proxy_pids(mode)?;
        let mut out = [Memory::default(); 2];
        for (m, pid) in out.iter_mut().zip(pids) {
            let (rss_kib, hwm_kib, anon_kib) = proc_memory_kib(pid)?;
            *m = Memory {
                rss_kib,
                hwm_kib,
                anon_kib,
            };
        }
        Ok(out)
    }

    fn cpu_snapshot(&self, mode: Mode) -> Result<CpuSnapshot> {
        let pids = self.proxy_pids(mode)?;
        Ok(CpuSnapshot {
            proxies: [proc_cpu_ticks(pids[0])?, proc_cpu_ticks(pids[1])?],
            servers: [self.nginx_pid, self.iperf3_server_pid]
                .iter()
                .map(|&pid| proc_cpu_ticks(pid).map(|(u, s)| u + s))
                .sum::<Result<u64>>()?,
            children: children_cpu_ticks(),
            machine: machine_ticks(),
            proxy_switches: [
                proc_context_switches(pids[0]),
                proc_context_switches(pids[1]),
            ],
            at: Instant::now(),
        })
    }

    fn cpu_since(&self, before: &CpuSnapshot, mode: Mode) -> Result<CpuUse> {
        let now = self.cpu_snapshot(mode)?;
        let ms = |ticks: u64| ticks as f64 * 1000.0 / self.clk_tck as f64;
        let proxy = |i: usize| {
            (
                ms(now.proxies[i].0.saturating_sub(before.proxies[i].0)),
                ms(now.proxies[i].1.saturating_sub(before.proxies[i].1)),
            )
        };
        Ok(CpuUse {
            proxies: [proxy(0), proxy(1)],
            servers: ms(now.servers.saturating_sub(before.servers)),
            load_generator: ms(now.children.saturating_sub(before.children)),
            machine_busy: ms(now.machine.0.saturating_sub(before.machine.0)),
            machine_steal: ms(now.machine.1.saturating_sub(before.machine.1)),
            wall: now.at.duration_since(before.at).as_secs_f64() * 1000.0,
            proxy_context_switches: (0..2)
                .map(|i| {
                    now.proxy_switches[i]
                        .0
                        .saturating_sub(before.proxy_switches[i].0)
                })
                .sum(),
            proxy_threads: [now.proxy_switches[0].1, now.proxy_switches[1].1],
        })
    }

    /// Tails of the agents', HAProxy's, nginx's and iperf3's logs, for error
    /// messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for agent in &self.agents {
            let log = agent.log();
            let _ = writeln!(
                out,
                "---- agent on {} ({}) ----\n{}",
                agent.node(),
                agent.log_path().display(),
                tail(&log, 60)
            );
        }
        let _ = writeln!(out, "{}", self.haproxy.logs(&self.topo));
        let error_log = self.topo.work_dir().join("nginx-error.log");
        let _ = writeln!(
            out,
            "---- nginx error log ----\n{}",
            tail(&std::fs::read_to_string(&error_log).unwrap_or_default(), 30)
        );
        for log in ["nginx", "iperf3-server"] {
            let _ = writeln!(
                out,
                "---- {log} output ----\n{}",
                tail(&self.topo.read_log(log), 30)
            );
        }
        out
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Namespace `bench` (labelled when `enrolled`) with the two workloads
/// and the Service `server`. Direct runs target the server pod's address:
/// a cluster IP only exists inside the mesh.
fn write_config(topo: &Topology, dir: &Path, enrolled: bool) -> Result<()> {
    config::write(
        dir,
        "bench.yaml",
        &[
            config::namespace(NAMESPACE, enrolled),
            config::workload(topo.pod(CLIENT), NAMESPACE, &[("app", CLIENT)]),
            config::workload(topo.pod(SERVER), NAMESPACE, &[("app", SERVER)]),
            config::service_with_ports(
                SERVER,
                NAMESPACE,
                &[("app", SERVER)],
                &[
                    ServicePort {
                        name: "http",
                        port: SERVICE_PORT,
                        target_port: HTTP_PORT,
                    },
                    ServicePort {
                        name: "http2",
                        port: SERVICE_HTTP2_PORT,
                        target_port: HTTP2_PORT,
                    },
                ],
                Some(SERVICE_IP),
            ),
        ],
    )
}

/// In a file of its own, so changing the table rewrites nothing else.
fn write_routes(dir: &Path, routes: usize) -> Result<()> {
    config::write_raw(
        dir,
        "routes.yaml",
        &routes::virtual_service(NAMESPACE, SERVER, routes),
    )
}

/// nginx in the foreground, one process, 1 KB `return 200`; every path it
/// writes is in the work directory.
fn start_nginx(topo: &mut Topology, nginx: &Path, netns: &str) -> Result<u32> {
    let dir = topo.work_dir().join("nginx");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.display();
    let body = "x".repeat(BODY_SIZE);
    let conf = format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {w}/nginx-error.log;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    default_type text/plain;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {HTTP_PORT} backlog=4096;
        location / {{
            add_header {echo} $http_x_forwarded_client_cert;
            return 200 \"{body}\";
        }}
    }}
    server {{
        listen {HTTP2_PORT} http2 backlog=4096;
        location / {{
            add_header {echo} $http_x_forwarded_client_cert;
            add_header {protocol} $server_protocol;
            return 200 \"{body}\";
        }}
    }}
}}
",
        w = topo.work_dir().display(),
        echo = mtls::ECHO_HEADER,
        protocol = PROTOCOL_HEADER,
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let nginx = nginx.to_string_lossy().into_owned();
    let prefix = format!("{d}/");
    let error_log = topo.work_dir().join("nginx-error.log");
    let conf_s = conf_path.to_string_lossy().into_owned();
    let error_s = error_log.to_string_lossy().into_owned();
    let pid = topo.spawn_in(
        netns,
        &[&nginx, "-p", &prefix, "-e", &error_s, "-c", &conf_s],
        "nginx",
    )?;
    wait_listening(topo, netns, HTTP_PORT)
        .and_then(|()| wait_listening(topo, netns, HTTP2_PORT))
        .with_context(|| {
            format!(
                "nginx did not start; error log:\n{}",
                tail(&std::fs::read_to_string(&error_log).unwrap_or_default(), 20)
            )
        })?;
    Ok(pid)
}

// ---------------------------------------------------------------- report

/// Retries `check` until it passes or [`CONFIG_TIMEOUT`] is over: a new
/// config generation may still be the previous file's (the directory
/// watcher can load twice for one write), so what a change brings is
/// checked, not only that a generation passed.
fn until_config_applied<T>(mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match check() {
            Err(_) if start.elapsed() < CONFIG_TIMEOUT => std::thread::sleep(CONFIG_POLL),
            outcome => return outcome,
        }
    }
}
