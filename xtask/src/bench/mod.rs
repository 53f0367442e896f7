//! `cargo xtask bench [--duration 10s | --quick] [--rounds N]`: what the mesh costs,
//! measured against a direct, un-meshed run on the same topology in the same
//! invocation (DESIGN.md, "Targets to design for").
//!
//! Topology: two nodes (one agent each), a `client` pod on node-a and a
//! `server` pod on node-b, so meshed traffic takes the design's two-agent
//! path (outbound on the client's node, inbound on the server's node). The
//! server pod runs nginx (one worker, 1 KB `return 200` responses, so the
//! backend is not the bottleneck) and an iperf3 server; the load comes from
//! oha and the iperf3 client in the client pod.
//!
//! `--rounds N` repeats the whole direct + meshed sequence and reports
//! medians: on shared 2-vCPU VMs one round's direct req/s varies by up to
//! ±20 % from run to run.
//!
//! The pods' namespace `bench` also holds a Service `server` (port 80,
//! named `http`, so declared HTTP) with a VirtualService. Every round runs
//! first DIRECT (the namespace is not labelled: the agents run but capture
//! nothing), then MESHED (the same config with the namespace labelled
//! `nodemesh.io/mesh: enabled`), same pods, same addresses. DIRECT targets
//! the server pod's address, the only one reachable without the mesh;
//! MESHED runs the same phases against it, which the agents relay as opaque
//! TCP (L4), and then the HTTP phases again against the Service's cluster
//! IP, which the client-side agent terminates and routes (L7):
//! 1. HTTP/1.1 max throughput: 16 keep-alive connections, 1 KB responses;
//! 2. latency at a fixed 2000 req/s over 16 connections (p50, p90, p99);
//! 3. connection rate: a new TCP connection per request, 16 concurrent (L4);
//! 4. bulk TCP: iperf3, one stream (L4);
//! 5. meshed only, L7: phases 1 and 2 to the Service, once with a
//!    VirtualService of 10 routes (the headline L7 figures) and once with
//!    10 000, requests matching only the last route (see `routes.rs`); the
//!    difference is what the size of a route table costs each request.
//!    Before each, the bench checks that both agents serve the table and
//!    that a request is answered by nginx through that last route.
//!
//! L4 and L7 share the direct run as their baseline, so the table shows
//! what routing adds on top of the relay.
//!
//! During every phase the CPU time of both agents, the servers, the load
//! generator and the whole machine is sampled from /proc: the agents' CPU
//! per 1000 requests comes from phase 1 (and, for the route tables, also
//! from phase 2, where both tables see the same request rate), and a phase
//! in which other work or hypervisor steal took a noticeable share of the
//! machine is flagged. The agents' RSS (and peak) is read after every
//! phase; the tables show it after the L7 phases of the first round (an
//! agent's RSS does not shrink once the 10 000-route table is replaced).
//! Results are printed as two tables, meshed against direct with the design
//! targets beside the meshed figures (informative only: a missed target
//! never fails the command; errors in the traffic do), and 10 000 routes
//! against 10; and written to `target/bench/results.json`.
//!
//! Benchmark-harness tuning, applied to every namespace of the topology in
//! both modes alike: `net.ipv4.tcp_tw_reuse=1` and a wide ephemeral port
//! range, so that the connection-rate phase (tens of thousands of short
//! connections to one address) does not run out of ports because of
//! TIME_WAIT.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::workload_apps::wait_listening;
use nodemesh_testbed::{config, Agent, Topology};
use serde_json::{json, Value};

mod procfs;
mod report;
mod results;
mod routes;

use procfs::{
    children_cpu_ticks, clock_ticks_per_second, loadavg, machine_ticks, num_cpus,
    proc_context_switches, proc_cpu_ticks, proc_memory_kib,
};
use report::{cpu_breakdown, render, route_table, table, Row};
use results::{
    per_1000, Captured, CpuSnapshot, CpuUse, HttpPhases, HttpRun, L7Result, Memory, Mode,
    ModeResult,
};

const USAGE: &str = "\
usage: cargo xtask bench [--duration DURATION | --quick] [--rounds N]

  --duration D   length of each oha phase, e.g. 10s, 1500ms, 1m (default 10s)
  --quick        smoke run: 3 s phases
  --rounds N     repeat direct + meshed N times and report medians (default 1)
";

/// The Kubernetes namespace of both pods.
const NAMESPACE: &str = "bench";
const CLIENT: &str = "client";
const SERVER: &str = "server";
const HTTP_PORT: u16 = 8080;
/// The Service's port; named `http`, so the agent routes it without
/// waiting for detection.
const SERVICE_PORT: u16 = 80;
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

// Design targets (DESIGN.md, "Targets to design for").
const TARGET_RPS_PERCENT: f64 = 48.0;
const TARGET_P50_DELTA_MS: f64 = 0.15;
const TARGET_CPU_MS_PER_1000: f64 = 40.0;
const TARGET_RSS_MB: f64 = 12.0;
const TARGET_BULK_PERCENT: f64 = 60.0;

pub fn run(nodemesh: &Path, args: &[String]) -> Result<()> {
    let Some(opts) = Options::parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let oha = Oha::find_or_install()?;
    let nginx = find_program("nginx", &["/usr/sbin/nginx"])?;
    let iperf3 = find_program("iperf3", &["/usr/bin/iperf3"])?;
    let clk_tck = clock_ticks_per_second();
    let load_before = loadavg();

    println!(
        "bench: {} per oha phase, {} iperf3, {CONNECTIONS} connections, {BODY_SIZE} B responses \
         (oha {}, {} CPUs, load average {})",
        human(opts.duration),
        human(opts.bulk),
        oha.version,
        num_cpus(),
        load_before
    );
    let mut bench = Bench::new(nodemesh, &oha, &nginx, &iperf3, &opts, clk_tck)?;
    let result = bench.measure_rounds();
    let (direct, meshed) = match result {
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

    let rows = table(&direct, &meshed);
    println!();
    print!("{}", render(&rows, ["metric", "direct", "meshed", "ratio"]));
    println!(
        "\nL4: to the server pod's address, relayed as opaque TCP by both agents. L7: to the \
         Service, routed\nby the client-side agent (VirtualService, {} routes, the last \
         matching). Targets are the design's\nfor L7 + mTLS through two agents (informative \
         only). p99 on shared VMs is dominated by\nhypervisor steal: judge by p50/p90 and CPU.",
        ROUTE_COUNTS[0]
    );
    let route_rows = route_table(&meshed);
    let sizes = ROUTE_COUNTS.map(|n| format!("{n} routes"));
    println!("\nRoute-table size, meshed L7, requests matching the last route:");
    print!(
        "{}",
        render(&route_rows, ["metric", &sizes[0], &sizes[1], "difference"])
    );
    println!(
        "The CPU differences (ms per 1000 requests = µs per request) are the per-request cost \
         of the larger\ntable. Design: the same with 10 and with 10 000 routes."
    );
    let warnings: Vec<&String> = direct
        .iter()
        .chain(&meshed)
        .flat_map(|r| &r.warnings)
        .collect();
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
    print!("{}", cpu_breakdown(&direct, &meshed));

    let doc = json!({
        "settings": {
            "duration_seconds": opts.duration.as_secs_f64(),
            "rounds": opts.rounds,
            "bulk_seconds": opts.bulk.as_secs_f64(),
            "connections": CONNECTIONS,
            "fixed_rate": FIXED_RATE,
            "body_bytes": BODY_SIZE,
            "route_counts": ROUTE_COUNTS,
            "oha": oha.version,
            "cpus": num_cpus(),
            "load_average_before": load_before,
            "clock_ticks_per_second": clk_tck,
        },
        "direct": direct.iter().map(ModeResult::to_json).collect::<Vec<_>>(),
        "meshed": meshed.iter().map(ModeResult::to_json).collect::<Vec<_>>(),
        "comparison": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "route_count_cost": route_rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let out_dir = super::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")
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
}

impl Options {
    /// `None` for `--help`.
    fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut duration = Duration::from_secs(10);
        let mut rounds = 1;
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
        Ok(Some(Options {
            duration,
            bulk: duration.min(BULK_MAX),
            rounds,
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
    topo: Topology,
    oha: &'a Oha,
    iperf3: PathBuf,
    opts: &'a Options,
    config_dir: PathBuf,
    client_netns: String,
    server_ip: String,
    nginx_pid: u32,
    iperf3_server_pid: u32,
    clk_tck: u64,
    /// The configuration last written.
    mode: Mode,
    routes: usize,
}

/// What a mode's phases leave behind besides their figures.
struct PhaseLog {
    mode: Mode,
    /// (started, total), for the `[n/total]` progress lines.
    steps: (usize, usize),
    warnings: Vec<String>,
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
        nginx: &Path,
        iperf3: &Path,
        opts: &'a Options,
        clk_tck: u64,
    ) -> Result<Bench<'a>> {
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
        for ns in [
            topo.node("node-a").netns.clone(),
            topo.node("node-b").netns.clone(),
            client.netns.clone(),
            server.netns.clone(),
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

        let nginx_pid = start_nginx(&mut topo, nginx, &server.netns)?;
        let iperf3_s = iperf3.to_string_lossy().into_owned();
        let port = IPERF_PORT.to_string();
        let iperf3_server_pid = topo.spawn_in(
            &server.netns,
            &[&iperf3_s, "-s", "-p", &port],
            "iperf3-server",
        )?;
        wait_listening(&topo, &server.netns, IPERF_PORT)?;

        let config_dir = topo.work_dir().join("config");
        write_config(&topo, &config_dir, Mode::Direct)?;
        write_routes(&config_dir, ROUTE_COUNTS[0])?;
        println!("bench: starting one agent per node");
        let a = Agent::start_with(&mut topo, "node-a", &config_dir, nodemesh, &[])?;
        let b = Agent::start_with(&mut topo, "node-b", &config_dir, nodemesh, &[])?;
        let bench = Bench {
            agents: vec![a, b],
            topo,
            oha,
            iperf3: iperf3.to_path_buf(),
            opts,
            config_dir,
            client_netns: client.netns.clone(),
            server_ip: server.address.to_string(),
            nginx_pid,
            iperf3_server_pid,
            clk_tck,
            mode: Mode::Direct,
            routes: ROUTE_COUNTS[0],
        };
        bench.wait_config(&[0, 0])?;
        Ok(bench)
    }

    /// `rounds` times: every phase direct, then every phase meshed.
    fn measure_rounds(&mut self) -> Result<(Vec<ModeResult>, Vec<ModeResult>)> {
        let (mut direct, mut meshed) = (Vec::new(), Vec::new());
        for round in 1..=self.opts.rounds {
            if round > 1 {
                println!("\n######## round {round} of {}", self.opts.rounds);
                self.set_routes(ROUTE_COUNTS[0])?;
                self.set_mode(Mode::Direct)?;
            }
            direct.push(self.measure(Mode::Direct)?);
            self.set_mode(Mode::Meshed)?;
            meshed.push(self.measure(Mode::Meshed)?);
        }
        Ok((direct, meshed))
    }

    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let generations = self.generations()?;
        write_config(&self.topo, &self.config_dir, mode)?;
        self.mode = mode;
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
    /// that holds the config of `self.mode` and `self.routes`: both
    /// workloads known and enrolled (meshed) or not (direct), the Service,
    /// and its routes. A rejected config fails at once rather than at the
    /// timeout.
    fn wait_config(&self, after: &[u64]) -> Result<()> {
        let want_enrolled = u64::from(self.mode == Mode::Meshed);
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
                        "the agent on {} did not reach the {} configuration ({want_enrolled} \
                         workload enrolled, {want_routes} HTTP routes) within \
                         {CONFIG_TIMEOUT:?}: {status:#}\nagent log:\n{}",
                        agent.node(),
                        self.mode.name(),
                        tail(&agent.log(), 40)
                    );
                }
                std::thread::sleep(CONFIG_POLL);
            }
        }
        Ok(())
    }

    fn measure(&mut self, mode: Mode) -> Result<ModeResult> {
        let name = mode.name();
        println!("\n== {} ==", name.to_uppercase());
        let pod_url = format!("http://{}:{HTTP_PORT}{}", self.server_ip, routes::PATH);
        let counts_before = self.agent_counts()?;
        let mut log = PhaseLog {
            mode,
            steps: (
                0,
                if mode == Mode::Meshed {
                    4 + 2 * ROUTE_COUNTS.len()
                } else {
                    4
                },
            ),
            warnings: Vec::new(),
            memory_trace: vec![("start".into(), self.agent_memory()?)],
        };

        self.warm_up(&pod_url)?;
        let path = match mode {
            Mode::Direct => "pod IP",
            Mode::Meshed => "L4, pod IP",
        };
        let l4 = self.http_phases(&mut log, &pod_url, path)?;

        log.step(&format!(
            "connection rate: a new connection per request, {CONNECTIONS} concurrent, {}",
            human(self.opts.duration)
        ));
        let conns = CONNECTIONS.to_string();
        let d = human(self.opts.duration);
        let (conn_rate, conn_rate_cpu) = self.phase(&mut log, "connection rate", |b| {
            b.oha(
                &["-c", &conns, "--disable-keepalive", "-z", &d, &pod_url],
                "connection rate",
            )
        })?;
        println!("        {:.0} connections/s", conn_rate.rps);

        log.step(&format!("bulk TCP: iperf3, {}", human(self.opts.bulk)));
        let (bulk, bulk_cpu) = self.phase(&mut log, "bulk", |b| b.iperf3())?;
        println!("        {:.2} Gbit/s", bulk / 1e9);

        let mut l7 = Vec::new();
        if mode == Mode::Meshed {
            for routes in ROUTE_COUNTS {
                l7.push(self.l7_phases(&mut log, routes)?);
            }
        }

        let counts_after = self.agent_counts()?;
        let captured = Captured {
            outbound_a: counts_after[0].0.saturating_sub(counts_before[0].0),
            inbound_b: counts_after[1].1.saturating_sub(counts_before[1].1),
            failed: (counts_after[0].2 + counts_after[1].2)
                .saturating_sub(counts_before[0].2 + counts_before[1].2),
        };
        match mode {
            Mode::Direct if captured.outbound_a + captured.inbound_b > 0 => bail!(
                "the direct run went through the agents ({} outbound on node-a, {} inbound on \
                 node-b): the un-labelled namespace was captured",
                captured.outbound_a,
                captured.inbound_b
            ),
            // At least the 16 keep-alive connections of each oha run.
            Mode::Meshed
                if captured.outbound_a < u64::from(CONNECTIONS)
                    || captured.inbound_b < u64::from(CONNECTIONS) =>
            {
                bail!(
                    "the meshed run did not go through both agents ({} outbound on node-a, {} \
                     inbound on node-b)",
                    captured.outbound_a,
                    captured.inbound_b
                )
            }
            _ => {}
        }
        if mode == Mode::Meshed {
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
            l4,
            l7,
            conn_rate,
            conn_rate_cpu,
            bulk_cpu,
            warnings: log.warnings,
            bulk_bits_per_second: bulk,
            memory_trace: log.memory_trace,
            captured,
        })
    }

    /// The HTTP phases through the client-side agent's L7 proxy, with a
    /// VirtualService of `routes` routes of which requests match the last.
    fn l7_phases(&mut self, log: &mut PhaseLog, routes: usize) -> Result<L7Result> {
        let applied_after = self.set_routes(routes)?;
        let url = format!("http://{SERVICE_IP}:{SERVICE_PORT}{}", routes::PATH);
        routes::check_response(&self.topo, &self.client_netns, &url, routes, BODY_SIZE)?;
        println!(
            "  VirtualService with {routes} routes served {:.0} ms after the write; \
             a request takes the last route",
            applied_after.as_secs_f64() * 1000.0
        );
        self.warm_up(&url)?;
        let http = self.http_phases(log, &url, &format!("L7, {routes} routes"))?;
        let memory = self.agent_memory()?;
        // Last: the listing's own allocations must not count as the table's.
        let listing =
            routes::check_table(&self.agents[0], &format!("{NAMESPACE}/{SERVER}"), routes)?;
        println!(
            "        `nodemesh routes` lists the {routes} routes ({:.1} MB of JSON)",
            listing as f64 / 1e6
        );
        Ok(L7Result {
            routes,
            http,
            applied_after,
            memory,
        })
    }

    /// Max throughput, then latency at the fixed rate, against `url`.
    fn http_phases(&self, log: &mut PhaseLog, url: &str, path: &str) -> Result<HttpPhases> {
        let conns = CONNECTIONS.to_string();
        let d = human(self.opts.duration);
        log.step(&format!(
            "HTTP/1.1 max throughput ({path}): {CONNECTIONS} keep-alive connections, {d}"
        ));
        let phase = format!("max throughput ({path})");
        let (throughput, throughput_cpu) = self.phase(log, &phase, |b| {
            b.oha(&["-c", &conns, "-z", &d, url], &phase)
        })?;
        println!(
            "        {:.0} req/s, p50 {:.3} ms; agents {:.1} ms CPU per 1000 req",
            throughput.rps,
            throughput.p50_ms,
            per_1000(throughput_cpu.agents_total(), throughput.ok)
        );

        log.step(&format!(
            "latency ({path}) at {FIXED_RATE} req/s over {CONNECTIONS} connections, {d}"
        ));
        let rate = FIXED_RATE.to_string();
        let phase = format!("fixed rate ({path})");
        let (latency, latency_cpu) = self.phase(log, &phase, |b| {
            b.oha(&["-c", &conns, "-q", &rate, "-z", &d, url], &phase)
        })?;
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
    fn warm_up(&self, url: &str) -> Result<()> {
        let conns = CONNECTIONS.to_string();
        self.oha(&["-c", &conns, "-z", &human(WARMUP), url], "warm-up")?;
        Ok(())
    }

    /// Runs `f` and returns its result with the CPU it cost; notes the
    /// agents' memory afterwards and whether other work skewed it.
    fn phase<T>(
        &self,
        log: &mut PhaseLog,
        name: &str,
        f: impl FnOnce(&Self) -> Result<T>,
    ) -> Result<(T, CpuUse)> {
        let before = self.cpu_snapshot()?;
        let value = f(self)?;
        let cpu = self.cpu_since(&before)?;
        log.memory_trace
            .push((name.to_string(), self.agent_memory()?));
        if let Some(w) = cpu.interference(&format!("{} {name}", log.mode.name())) {
            println!("  warning: {w}");
            log.warnings.push(w);
        }
        Ok((value, cpu))
    }

    /// Runs oha in the client pod and checks that (almost) every request
    /// succeeded.
    fn oha(&self, args: &[&str], what: &str) -> Result<HttpRun> {
        self.check_agents()?;
        let oha = self.oha.path.to_string_lossy().into_owned();
        let mut cmd = vec![oha.as_str(), "--no-tui"];
        cmd.extend(self.oha.json_args.iter().copied());
        if let Some(w) = self.oha.wait_flag {
            cmd.push(w);
        }
        cmd.extend_from_slice(args);
        let out = self
            .topo
            .command_in(&self.client_netns, &cmd)?
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
            self.check_agents()
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
        self.check_agents()?;
        Ok(run)
    }

    /// Runs the iperf3 client in the client pod; returns bits/s received.
    fn iperf3(&self) -> Result<f64> {
        self.check_agents()?;
        let iperf3 = self.iperf3.to_string_lossy().into_owned();
        let port = IPERF_PORT.to_string();
        let secs = format!("{}", self.opts.bulk.as_secs().max(1));
        let cmd = [
            iperf3.as_str(),
            "-c",
            &self.server_ip,
            "-p",
            &port,
            "-t",
            &secs,
            "-J",
        ];
        let out = self.topo.run_in(&self.client_netns, &cmd)?;
        self.check_agents().context("bulk TCP")?;
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
        let bps = doc["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| {
                format!("no end.sum_received.bits_per_second in iperf3's JSON: {doc}")
            })?;
        Ok(bps)
    }

    fn check_agents(&self) -> Result<()> {
        for agent in &self.agents {
            if !agent.is_running() {
                bail!("the agent on {} has exited", agent.node());
            }
        }
        if !self.topo.is_running(self.nginx_pid) {
            bail!("nginx has exited");
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
        let mut out = Vec::new();
        for agent in &self.agents {
            let list = agent.cli(&["connections", "-o", "json"])?;
            let list: Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
            for c in list.as_array().into_iter().flatten() {
                if c["outcome"] != "ok" {
                    out.push(format!(
                        "{}: {} {} to {} after {} ms: {}",
                        agent.node(),
                        c["direction"].as_str().unwrap_or("?"),
                        c["protocol"].as_str().unwrap_or("?"),
                        c["original_destination"].as_str().unwrap_or("?"),
                        c["duration_ms"],
                        c["outcome"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
        Ok(out)
    }

    fn agent_memory(&self) -> Result<[Memory; 2]> {
        let pids = self.agent_pids()?;
        let mut out = [Memory::default(); 2];
        for (m, pid) in out.iter_mut().zip(pids) {
            let (rss_kib, hwm_kib) = proc_memory_kib(pid)?;
            *m = Memory { rss_kib, hwm_kib };
        }
        Ok(out)
    }

    fn cpu_snapshot(&self) -> Result<CpuSnapshot> {
        let pids = self.agent_pids()?;
        Ok(CpuSnapshot {
            agents: [proc_cpu_ticks(pids[0])?, proc_cpu_ticks(pids[1])?],
            servers: [self.nginx_pid, self.iperf3_server_pid]
                .iter()
                .map(|&pid| proc_cpu_ticks(pid).map(|(u, s)| u + s))
                .sum::<Result<u64>>()?,
            children: children_cpu_ticks(),
            machine: machine_ticks(),
            agent_switches: [
                proc_context_switches(pids[0]),
                proc_context_switches(pids[1]),
            ],
            at: Instant::now(),
        })
    }

    fn cpu_since(&self, before: &CpuSnapshot) -> Result<CpuUse> {
        let now = self.cpu_snapshot()?;
        let ms = |ticks: u64| ticks as f64 * 1000.0 / self.clk_tck as f64;
        let agent = |i: usize| {
            (
                ms(now.agents[i].0.saturating_sub(before.agents[i].0)),
                ms(now.agents[i].1.saturating_sub(before.agents[i].1)),
            )
        };
        Ok(CpuUse {
            agents: [agent(0), agent(1)],
            servers: ms(now.servers.saturating_sub(before.servers)),
            load_generator: ms(now.children.saturating_sub(before.children)),
            machine_busy: ms(now.machine.0.saturating_sub(before.machine.0)),
            machine_steal: ms(now.machine.1.saturating_sub(before.machine.1)),
            wall: now.at.duration_since(before.at).as_secs_f64() * 1000.0,
            agent_context_switches: (0..2)
                .map(|i| {
                    now.agent_switches[i]
                        .0
                        .saturating_sub(before.agent_switches[i].0)
                })
                .sum(),
            agent_threads: [now.agent_switches[0].1, now.agent_switches[1].1],
        })
    }

    /// Tails of the agents', nginx's and iperf3's logs, for error messages.
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

/// Namespace `bench` (labelled only when meshed) with the two workloads
/// and the Service `server`. Direct runs target the server pod's address:
/// a cluster IP only exists inside the mesh.
fn write_config(topo: &Topology, dir: &Path, mode: Mode) -> Result<()> {
    config::write(
        dir,
        "bench.yaml",
        &[
            config::namespace(NAMESPACE, mode == Mode::Meshed),
            config::workload(topo.pod(CLIENT), NAMESPACE, &[("app", CLIENT)]),
            config::workload(topo.pod(SERVER), NAMESPACE, &[("app", SERVER)]),
            config::service(
                SERVER,
                NAMESPACE,
                &[("app", SERVER)],
                SERVICE_PORT,
                HTTP_PORT,
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
            return 200 \"{body}\";
        }}
    }}
}}
",
        w = topo.work_dir().display()
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
    wait_listening(topo, netns, HTTP_PORT).with_context(|| {
        format!(
            "nginx did not start; error log:\n{}",
            tail(&std::fs::read_to_string(&error_log).unwrap_or_default(), 20)
        )
    })?;
    Ok(pid)
}

// ---------------------------------------------------------------- report
