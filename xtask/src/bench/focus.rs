//! `cargo xtask bench --focus [--http2] [--against OTHER_NODEMESH]...`: the
//! headline L7 + mTLS path alone (in HTTP/1.1, or HTTP/2 with `--http2`),
//! the cost of a new L4 + mTLS connection and of an open one, and bulk TCP,
//! for profiling and for A/B comparisons of two agent builds.
//!
//! The full bench takes many minutes; working on the data path's cost needs a
//! measurement that takes a minute or two. Per round and per agent build, on
//! a fresh topology: direct max throughput (the reference), then L7 + mTLS to
//! the Service (10 routes) at max throughput and at 2000 req/s, then the
//! memory of 1000 connections held open to the server pod's address, then new
//! connections to the server pod's address (relayed as opaque TCP by the
//! client's agent over HBONE, served as HTTP by the server's agent; a new
//! connection per request, as many concurrent), then bulk TCP (one iperf3
//! stream to the pod's address, relayed over HBONE, against the same stream
//! before the namespace was labelled). Builds alternate within a round, so a
//! shared machine's load drifts over both alike. The agents' pids are printed
//! before the meshed phases so that `perf record -p` or `strace -c -p` can be
//! attached to them; with `perf` installed, each agent's syscalls, context
//! switches and mallocs per request (or new connection) are counted over the
//! meshed phases (`counters.rs`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::counters::{self, Counts};
use super::report::median;
use super::results::{per_1000, Bulk, CpuUse, HttpRun, HttpVersion, Mode, Transfer};
use super::{human, mtls, Bench, Options, PhaseLog, Tools, CONNECTIONS, FIXED_RATE};
use super::{Oha, ROUTE_COUNTS};

/// One build's figures from one round.
struct Sample {
    direct_rps: f64,
    max: (HttpRun, CpuUse),
    fixed: (HttpRun, CpuUse),
    /// New L4 + mTLS connections, one request each.
    connections: (HttpRun, CpuUse),
    rss_kib: [u64; 2],
    /// Anonymous memory per open L4 + mTLS connection (`held.rs`).
    held_kib: [f64; 2],
    /// Bulk TCP: direct, and over L4 + mTLS with both agents' CPU.
    bulk: (Transfer, Bulk),
    /// Per request and agent (node-a, node-b), at max, at the fixed rate
    /// and per new connection; empty without `perf`.
    counts: Vec<[Counts; 3]>,
}

pub(super) fn run(
    nodemesh: &Path,
    oha: &Oha,
    tools: &Tools,
    opts: &Options,
    clk_tck: u64,
) -> Result<()> {
    let builds: Vec<PathBuf> = std::iter::once(nodemesh.to_path_buf())
        .chain(opts.against.iter().cloned())
        .collect();
    let mut samples: Vec<Vec<Sample>> = builds.iter().map(|_| Vec::new()).collect();
    let probes = counters::probes(&builds, opts.allocations);
    for round in 1..=opts.rounds {
        for (build, out) in builds.iter().zip(&mut samples) {
            println!("\n== round {round}/{}: {} ==", opts.rounds, build.display());
            let mut bench = Bench::new(build, oha, tools, opts, clk_tck)?;
            out.push(measure(&mut bench, probes.as_ref())?);
        }
    }
    println!(
        "\nL7 + mTLS ({} routes), {} over {CONNECTIONS} keep-alive connections{}, {} phases, \
         medians of {} round(s); CPU and context switches are both agents' per request; L4 \
         con/s and ms/1000con: new L4 + mTLS connections, {CONNECTIONS} concurrent; KiB/conn: \
         anonymous memory per open L4 + mTLS connection; bulk: one iperf3 stream over L4 + \
         mTLS, ms of agent CPU per GB:",
        ROUTE_COUNTS[0],
        opts.version.name(),
        opts.version.streams_label(),
        human(opts.duration),
        opts.rounds
    );
    println!(
        "{:<40} {:>9} {:>8} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>10} {:>12} {:>13} {:>11} \
         {:>8} {:>8}",
        "build",
        "req/s",
        "% direct",
        "ms/1000",
        "cs/req",
        "ms/1000@2k",
        "cs/req@2k",
        "p50@2k ms",
        "L4 con/s",
        "ms/1000con",
        "RSS a/b MB",
        "KiB/conn a/b",
        "bulk Gb/s",
        "% direct",
        "ms/GB"
    );
    for (build, s) in builds.iter().zip(&samples) {
        let med = |f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f));
        let cs = |(run, cpu): &(HttpRun, CpuUse)| cpu.proxy_context_switches as f64 / run.ok as f64;
        println!(
            "{:<40} {:>9.0} {:>8.1} {:>10.1} {:>9.2} {:>10.1} {:>9.2} {:>9.3} {:>8.0} {:>10.1} \
             {:>5.1}/{:<5.1} {:>6.1}/{:<6.1} {:>11.2} {:>8.1} {:>8.1}",
            build.display().to_string(),
            med(&|x| x.max.0.rps),
            med(&|x| 100.0 * x.max.0.rps / x.direct_rps),
            med(&|x| per_1000(x.max.1.proxies_total(), x.max.0.ok)),
            med(&|x| cs(&x.max)),
            med(&|x| per_1000(x.fixed.1.proxies_total(), x.fixed.0.ok)),
            med(&|x| cs(&x.fixed)),
            med(&|x| x.fixed.0.p50_ms),
            med(&|x| x.connections.0.rps),
            med(&|x| per_1000(x.connections.1.proxies_total(), x.connections.0.ok)),
            med(&|x| x.rss_kib[0] as f64 / 1024.0),
            med(&|x| x.rss_kib[1] as f64 / 1024.0),
            med(&|x| x.held_kib[0]),
            med(&|x| x.held_kib[1]),
            med(&|x| x.bulk.1.transfer.bits_per_second / 1e9),
            med(&|x| 100.0 * x.bulk.1.transfer.bits_per_second / x.bulk.0.bits_per_second),
            med(&|x| x.bulk.1.cpu_ms_per_gigabyte()),
        );
    }
    if probes.is_some() {
        println!(
            "\nPer request (or new connection) and agent, medians (perf stat on each agent; CPU is \
             its task-clock):"
        );
        for (build, s) in builds.iter().zip(&samples) {
            for (agent, i) in [("node-a", 0), ("node-b", 1)] {
                let at = |phase: usize| {
                    median_counts(s.iter().filter_map(|x| x.counts.get(i).map(|c| c[phase])))
                };
                println!("{}, {agent}:", build.display());
                println!("  at max:        {}", at(0).describe());
                println!("  at {FIXED_RATE} req/s: {}", at(1).describe());
                println!("  new L4 conn:   {}", at(2).describe());
            }
        }
    }
    Ok(())
}

/// Each counter's median over the rounds.
fn median_counts(all: impl Iterator<Item = Counts> + Clone) -> Counts {
    let med = |f: fn(&Counts) -> Option<f64>| {
        let v: Vec<f64> = all.clone().filter_map(|c| f(&c)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    Counts {
        task_clock_ms: med(|c| c.task_clock_ms),
        context_switches: med(|c| c.context_switches),
        syscalls: med(|c| c.syscalls),
        mallocs: med(|c| c.mallocs),
        instructions: med(|c| c.instructions),
    }
}

fn measure(bench: &mut Bench, probes: Option<&counters::Probes>) -> Result<Sample> {
    let mut log = PhaseLog {
        mode: Mode::Direct,
        steps: (0, 7),
        warnings: Vec::new(),
        memory_trace: Vec::new(),
    };
    let d = human(bench.opts.duration);
    let conns = CONNECTIONS.to_string();
    let version = bench.opts.version;
    let pod = bench.pod_url();
    let from = bench.client_netns.clone();
    let from = from.as_str();
    let direct_url = match version {
        HttpVersion::Http1 => pod.clone(),
        HttpVersion::Http2 => bench.check_http2(Mode::Direct)?,
    };
    bench.warm_up_with(from, &direct_url, version)?;
    log.step("direct max throughput");
    let (direct, _) = bench.phase(&mut log, "direct", |b| {
        let args = version.oha_args(true, &["-c", &conns, "-z", &d, &direct_url]);
        b.oha(from, &args, "direct")
    })?;
    println!("        {:.0} req/s", direct.rps);
    let pod_iperf3 = bench.pod_iperf3();
    let direct_bulk = bench
        .bulk_phase(&mut log, "direct bulk TCP", "direct bulk", &pod_iperf3)?
        .transfer;

    bench.set_enrolled(true)?;
    log.mode = Mode::MeshedMtls;
    let url = super::until_config_applied(|| match version {
        HttpVersion::Http1 => {
            let url = bench.service_url();
            mtls::check_hop(&bench.topo, &bench.client_netns, &url, Mode::MeshedMtls)?;
            Ok(url)
        }
        HttpVersion::Http2 => bench.check_http2(Mode::MeshedMtls),
    })?;
    bench.warm_up_with(from, &url, version)?;
    let pids = bench.agent_pids()?;
    println!(
        "  agents: node-a pid {}, node-b pid {} (attach profilers now)",
        pids[0], pids[1]
    );
    let counting = |phase: &str| -> Result<Option<counters::Counting>> {
        probes
            .map(|probes| counters::start(&pids, probes, &bench.config_dir, phase))
            .transpose()
    };
    let stop = |counting: Option<counters::Counting>, requests: u64| -> Result<Vec<Counts>> {
        let counts = match counting {
            Some(c) => c.stop()?,
            None => Vec::new(),
        };
        let counts: Vec<Counts> = counts.iter().map(|c| c.per(requests)).collect();
        for (agent, c) in ["node-a", "node-b"].iter().zip(&counts) {
            println!("        {agent} per request: {}", c.describe());
        }
        Ok(counts)
    };
    log.step("L7 + mTLS max throughput");
    let running = counting("max")?;
    let max = bench.phase(&mut log, "max", |b| {
        let args = version.oha_args(true, &["-c", &conns, "-z", &d, &url]);
        b.oha(from, &args, "max")
    })?;
    let at_max = stop(running, max.0.ok)?;
    println!(
        "        {:.0} req/s; agents {:.1} ms CPU per 1000 req, {:.2} context switches per req",
        max.0.rps,
        per_1000(max.1.proxies_total(), max.0.ok),
        max.1.proxy_context_switches as f64 / max.0.ok as f64
    );
    log.step(&format!("L7 + mTLS at {FIXED_RATE} req/s"));
    let rate = FIXED_RATE.to_string();
    let running = counting("fixed")?;
    let fixed = bench.phase(&mut log, "fixed", |b| {
        let args = version.oha_args(true, &["-c", &conns, "-q", &rate, "-z", &d, &url]);
        b.oha(from, &args, "fixed")
    })?;
    let at_fixed = stop(running, fixed.0.ok)?;
    println!(
        "        {} requests, p50 {:.3} ms; agents {:.1} ms CPU per 1000 req, {:.2} context switches \
         per req",
        fixed.0.ok,
        fixed.0.p50_ms,
        per_1000(fixed.1.proxies_total(), fixed.0.ok),
        fixed.1.proxy_context_switches as f64 / fixed.0.ok as f64
    );
    // Read here, the RSS column describes the L7 phases.
    let memory = bench.proxy_memory(Mode::MeshedMtls)?;
    let held = bench.held_phase(&mut log, from, &pod, "L4 + mTLS, pod IP")?;
    let running = counting("connections")?;
    let connections = bench.connection_rate(
        &mut log,
        from,
        &pod,
        "L4 + mTLS, pod IP",
        HttpVersion::Http1,
    )?;
    let per_connection = stop(running, connections.0.ok)?;
    let bulk = bench.bulk_phase(&mut log, "L4 + mTLS bulk TCP", "bulk", &pod_iperf3)?;
    println!(
        "        {:.1} % of direct; agents {:.1} ms CPU per GB",
        100.0 * bulk.transfer.bits_per_second / direct_bulk.bits_per_second,
        bulk.cpu_ms_per_gigabyte()
    );
    Ok(Sample {
        direct_rps: direct.rps,
        max,
        fixed,
        connections,
        rss_kib: [memory[0].rss_kib, memory[1].rss_kib],
        held_kib: held.kib,
        bulk: (direct_bulk, bulk),
        counts: (at_max.into_iter().zip(at_fixed).zip(per_connection))
            .map(|((max, fixed), connection)| [max, fixed, connection])
            .collect(),
    })
}
