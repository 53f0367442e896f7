//! `nodemesh`: the node agent (`nodemesh agent`) and the node-local CLI that
//! asks it what the mesh is doing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use nodemesh::telemetry::trace;
use nodemesh::{
    admin, agent, ca, cli, config, ebpf, identity, lifecycle, nofile, proxy, sources, telemetry,
    viz,
};

/// jemalloc rather than glibc's malloc (why: `nodemesh::memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (before `main`): exported
/// under the name its prefixed build looks for, as the `const char *` it
/// expects (a thin pointer to the first of NUL-terminated bytes).
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &u8 = &nodemesh::memory::JEMALLOC_OPTIONS[0];

#[derive(Parser)]
#[command(
    name = "nodemesh",
    version,
    about = "Sidecar-free service mesh: node agent and CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (as root).
    Agent(Box<AgentArgs>),
    /// Run the mesh CA, or issue a node credential (`nodemesh ca issue-node`).
    Ca(CaArgs),
    /// The node's workload certificates.
    Certs(QueryArgs),
    /// Data path, config and connection summary of the node.
    Status(QueryArgs),
    /// Configured workloads and whether they are enrolled here.
    Workloads(QueryArgs),
    /// Services, their cluster IPs and endpoints.
    Services(QueryArgs),
    /// Recently finished connections through the node's proxy.
    Connections(QueryArgs),
    /// The effective L7 routing table of every Service.
    Routes(QueryArgs),
    /// The Istio Gateways this node serves: addresses, ports, hosts and the
    /// VirtualServices bound to them.
    Gateways(QueryArgs),
    /// Which route, subset, endpoints, faults, timeout and retries a request
    /// would get, and whether AuthorizationPolicy lets it through; nothing
    /// is sent. From a workload (--from) or arriving at the node's ingress
    /// (--gateway): then also the Gateway server, TLS mode and certificate.
    Explain {
        /// The calling workload, `namespace/name`.
        #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
        from: Option<String>,
        /// Explain a request from outside the mesh arriving at this node's
        /// ingress on `[ADDRESS:]PORT` (an `https` URL goes through the TLS
        /// step with its host as SNI).
        #[arg(long, value_name = "[ADDRESS:]PORT")]
        gateway: Option<String>,
        /// The TLS server name the client sends (with --gateway), if not the
        /// URL's host; implies TLS.
        #[arg(long, requires = "gateway")]
        sni: Option<String>,
        /// e.g. http://reviews:9080/reviews/1
        url: String,
        /// A request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// The AuthorizationPolicies that apply to the node's workloads, in
    /// evaluation order, and the denials counted so far.
    Policies {
        /// Only this workload, `namespace/name` (any node's).
        #[arg(long)]
        workload: Option<String>,
        #[command(flatten)]
        query: QueryArgs,
    },
    /// Success rate, requests per second and latency percentiles per
    /// workload or Service over the last minute (like `linkerd viz stat`);
    /// inbound (what destinations served) unless --from or --to is given.
    Stat {
        #[arg(value_enum, default_value = "workload")]
        resource: viz::stat::Resource,
        /// Only rows of this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The calls this workload (`name` or `namespace/name`) made, by
        /// destination, as its agent saw them (caller-side faults included).
        #[arg(long)]
        from: Option<String>,
        /// The calls this workload received, by caller.
        #[arg(long, conflicts_with = "from")]
        to: Option<String>,
        /// How far back to count (at most 2m).
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        window: Duration,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        agents: Agents,
    },
    /// The busiest calls between workloads, refreshed every 2 s.
    Top {
        /// How far back each frame counts (at most 2m).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        window: Duration,
        /// Rows shown at most.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        agents: Agents,
    },
    /// Who calls whom, with rate, error rate and p99 per edge: a table,
    /// JSON, Graphviz DOT or an SVG picture.
    Graph {
        #[arg(short = 'o', long = "format", value_enum, default_value = "table")]
        output: viz::graph::Format,
        /// Write the DOT, SVG or JSON to this file instead of standard output.
        #[arg(long = "output")]
        file: Option<PathBuf>,
        /// How far back to count (at most 2m).
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        window: Duration,
        #[command(flatten)]
        agents: Agents,
    },
    /// Detach and remove a node's eBPF programs and maps (after its agent stopped).
    Uninstall {
        #[arg(long)]
        node_name: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// This node's name, as Workloads' `spec.node` names it.
    #[arg(long)]
    node_name: String,
    /// Admin socket (default /run/nodemesh/<node-name>.sock).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Resolver for names outside the mesh (default: first nameserver of /etc/resolv.conf).
    #[arg(long)]
    upstream_dns: Option<SocketAddr>,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Namespace whose PeerAuthentication without a selector applies to the
    /// whole mesh (Istio's root namespace).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Range for Services without a clusterIP.
    #[arg(long, default_value = "10.96.0.0/16", value_parser = parse_cidr)]
    service_cidr: (Ipv4Addr, u8),
    /// Give up connecting upstream after this long (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Reset connections idle in both directions this long.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Open connections one workload may hold; beyond, new ones are reset.
    /// Default: an even share of the open-file limit between enrolled
    /// workloads (a larger value is lowered to that share).
    #[arg(long)]
    max_connections_per_workload: Option<usize>,
    /// How long to wait for a client's first bytes on a Service port whose
    /// protocol is not declared, before treating it as opaque TCP. A server
    /// that speaks first is never delayed by it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    protocol_detection_timeout: Duration,
    /// Longest time to receive a request's head on an HTTP connection,
    /// counted from its start or from the end of the previous request (so
    /// it also closes idle keep-alive connections).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    http_header_read_timeout: Duration,
    /// An HTTP connection on which nothing moves in either direction this
    /// long is closed, requests in flight included (Envoy's stream idle
    /// timeout).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    http_idle_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection to the proxy.
    #[arg(long, default_value_t = 100)]
    http2_max_concurrent_streams: u32,
    /// HTTP requests one workload may have in flight through the proxy, over
    /// all its connections; beyond, new ones get an immediate 503.
    #[arg(long, default_value_t = 1024)]
    max_requests_per_workload: u32,
    /// Proxy worker threads. Each runs its own event loop and serves the
    /// connections placed on it from start to end; the agent's control work
    /// runs on one more thread.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// SPIFFE trust domain of the mesh's identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// `HOST:PORT` of `nodemesh ca`. Without it, workloads get no identity.
    #[arg(long, requires = "node_credential")]
    ca_address: Option<String>,
    /// Directory with this node's credential (`nodemesh ca issue-node`).
    #[arg(long)]
    node_credential: Option<PathBuf>,
    /// Lifetime asked for workload certificates (the CA may give less);
    /// they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// If another agent owns the node, have it hand the node over now (an
    /// upgrade in place) instead of standing by until it stops.
    #[arg(long)]
    take_over: bool,
    /// After handing the node over, longest time to let connections in
    /// flight finish before exiting.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Address of the Prometheus endpoint (`GET /metrics`): Istio's
    /// standard metrics and the agent's own `nodemesh_*`. `off` disables it.
    #[arg(long, default_value = "0.0.0.0:15020", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// OTLP/HTTP collector (Jaeger, Tempo, the OpenTelemetry Collector)
    /// that gets a client and a server span of each sampled request, e.g.
    /// `http://collector:4318` (`/v1/traces` is appended). Without it,
    /// nothing is traced and no trace header is touched.
    #[arg(long)]
    otlp_endpoint: Option<trace::Endpoint>,
    /// Percent of requests traced when the caller's trace context carries
    /// no sampling decision (Istio's default: 1).
    #[arg(long, default_value_t = 1.0, value_parser = parse_percent)]
    trace_sampling: f64,
    /// Access logs of every workload, on stdout: `text` (Envoy's default
    /// format), `json` or `off`. A Telemetry resource overrides it per
    /// namespace or workload.
    #[arg(long, default_value = "off", value_parser = parse_access_log)]
    access_log: AccessLogFlag,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a percentage from 0 to 100")),
    }
}

/// `--access-log`: a format, or `off`.
#[derive(Clone, Copy)]
struct AccessLogFlag(Option<telemetry::Format>);

fn parse_access_log(s: &str) -> Result<AccessLogFlag, String> {
    match s {
        "off" => Ok(AccessLogFlag(None)),
        "text" => Ok(AccessLogFlag(Some(telemetry::Format::Text))),
        "json" => Ok(AccessLogFlag(Some(telemetry::Format::Json))),
        _ => Err(format!("`{s}` is not one of text, json, off")),
    }
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|addr| MetricsAddr(Some(addr)))
        .map_err(|_| format!("`{s}` is not an address like 0.0.0.0:15020 (or `off`)"))
}

/// Where the config comes from: exactly one of a directory and the API server.
#[derive(Args)]
struct SourceArgs {
    /// Directory of YAML documents (Namespace, Workload, Service, Istio and Gateway API
    /// kinds), hot-reloaded.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API server instead (in-cluster service account, or
    /// --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file to reach the API server with.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
}

impl SourceArgs {
    /// `node`: the node whose pods to enroll (none for the CA).
    fn source(self, node: Option<String>) -> sources::Source {
        match self.config_dir {
            Some(dir) => sources::Source::Dir(dir),
            None => sources::Source::Kubernetes(sources::kube::Settings {
                kubeconfig: self.kubeconfig,
                node,
                port_failures: None,
            }),
        }
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct CaArgs {
    #[command(subcommand)]
    action: Option<CaAction>,
    /// Where the CA keeps its self-signed root (created on first start, key 0600).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Address to serve agents on, e.g. 0.0.0.0:15012.
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// The mesh's configuration, as the agents read it.
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    signer: CaSigner,
    /// Longest lifetime of a workload certificate.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_lifetime: Duration,
}

/// Where the CA's signing key comes from (shared by serving and `issue-node`).
#[derive(Args)]
struct CaSigner {
    /// Sign with an operator's CA in Istio's plug-in layout (ca-cert.pem,
    /// ca-key.pem, root-cert.pem, cert-chain.pem) instead of the state dir's root.
    #[arg(long, global = true)]
    plugin_certs: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local", global = true)]
    trust_domain: String,
}

#[derive(Subcommand)]
enum CaAction {
    /// Write a node's credential (node-cert.pem, node-key.pem, root-cert.pem)
    /// for the operator to install on that node.
    IssueNode {
        node: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        lifetime: Duration,
    },
}

#[derive(Args)]
struct QueryArgs {
    /// The agent's admin socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The node whose agent to ask (when several run here).
    #[arg(long)]
    node: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: cli::Output,
}

/// The agents `stat`, `top` and `graph` ask; their counts are merged.
#[derive(Args)]
struct Agents {
    /// An agent's admin socket (repeatable). Default: every agent running
    /// on this host (one per node).
    #[arg(long)]
    socket: Vec<PathBuf>,
    /// The agent of this node (repeatable).
    #[arg(long)]
    node: Vec<String>,
}

impl Agents {
    fn sockets(self) -> Result<Vec<PathBuf>, viz::VizError> {
        viz::sockets(self.socket, &self.node)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Ca(args) => run_ca(args),
        Command::Certs(q) => show(q, admin::Query::Certs),
        Command::Status(q) => show(q, admin::Query::Status),
        Command::Workloads(q) => show(q, admin::Query::Workloads),
        Command::Services(q) => show(q, admin::Query::Services),
        Command::Connections(q) => show(q, admin::Query::Connections),
        Command::Routes(q) => show(q, admin::Query::Routes),
        Command::Gateways(q) => show(q, admin::Query::Gateways),
        Command::Explain {
            from,
            gateway,
            sni,
            url,
            headers,
            method,
            query,
        } => parse_headers(&headers).and_then(|headers| {
            let ask = proxy::ExplainRequest {
                from,
                gateway,
                sni,
                url,
                headers,
                method,
            };
            show(query, admin::Query::Explain(ask))
        }),
        Command::Policies { workload, query } => show(query, admin::Query::Policies(workload)),
        Command::Stat {
            resource,
            namespace,
            from,
            to,
            window,
            output,
            agents,
        } => agents
            .sockets()
            .and_then(|sockets| viz::fetch(&sockets, window))
            .map(|edges| {
                let filter = viz::stat::Filter {
                    resource,
                    namespace,
                    from,
                    to,
                };
                viz::stat::print(&edges, &filter, output)
            })
            .map_err(anyhow::Error::from),
        Command::Top {
            window,
            limit,
            once,
            agents,
        } => agents
            .sockets()
            .and_then(|sockets| {
                viz::top::Top {
                    sockets,
                    window,
                    limit,
                    once,
                }
                .run()
            })
            .map_err(anyhow::Error::from),
        Command::Graph {
            output,
            file,
            window,
            agents,
        } => graph(agents, output, file, window),
        Command::Uninstall { node_name, bpffs } => {
            lifecycle::ownership::ensure_unowned(&bpffs, &node_name)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(ebpf::uninstall(&bpffs, &node_name)?))
                .map(|links| {
                    println!("node {node_name}: detached {links} eBPF link(s) and removed its pins")
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodemesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let nofile = nofile::raise_to_hard().context("raising RLIMIT_NOFILE")?;
    log::info!(
        "RLIMIT_NOFILE: soft limit {} (was {}), hard limit {}",
        nofile.soft,
        nofile.was,
        nofile.hard
    );
    let node_credential = args
        .node_credential
        .map(|dir| identity::NodeCredential::load(&dir, &args.node_name, &args.trust_domain))
        .transpose()?;
    let settings = agent::Settings {
        admin_socket: args.admin_socket.unwrap_or_else(|| {
            PathBuf::from(admin::SOCKET_DIR).join(format!("{}.sock", args.node_name))
        }),
        source: args.source.source(Some(args.node_name.clone())),
        node: args.node_name,
        bpffs: args.bpffs,
        upstream_dns: args.upstream_dns,
        load: config::LoadOptions {
            service_cidr: args.service_cidr,
            cluster_domain: args.cluster_domain,
            root_namespace: args.root_namespace,
            ..config::LoadOptions::default()
        },
        proxy: proxy::Settings {
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            protocol_detection_timeout: args.protocol_detection_timeout,
            max_connections_per_workload: args.max_connections_per_workload,
            tracing: args.otlp_endpoint.map(|endpoint| trace::Settings {
                endpoint,
                sampling_percent: args.trace_sampling,
            }),
            access_log: args.access_log.0,
            workers: args.workers,
            http: proxy::HttpSettings {
                header_read_timeout: args.http_header_read_timeout,
                idle_timeout: args.http_idle_timeout,
                max_concurrent_streams: args.http2_max_concurrent_streams,
                max_requests_per_workload: args.max_requests_per_workload,
            },
        },
        nofile,
        metrics_addr: args.metrics_addr.0,
        take_over: args.take_over,
        drain_timeout: args.drain_timeout,
    };
    let identities = identity::Identities::new(identity::IdentitiesSettings {
        trust_domain: args.trust_domain,
        cert_lifetime: args.cert_lifetime,
        ca_address: args.ca_address,
        node_credential,
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(agent::run(settings, identities))
}

fn run_ca(args: CaArgs) -> anyhow::Result<()> {
    let source = |state_dir: Option<PathBuf>| match (args.signer.plugin_certs.clone(), state_dir) {
        (Some(dir), _) => Ok(ca::Source::Plugin(dir)),
        (None, Some(dir)) => Ok(ca::Source::StateDir(dir)),
        (None, None) => Err(anyhow::anyhow!(
            "give --state-dir (a self-signed root kept there) or --plugin-certs (an operator's CA)"
        )),
    };
    let trust_domain = args.signer.trust_domain.clone();
    match args.action {
        Some(CaAction::IssueNode {
            node,
            state_dir,
            out,
            lifetime,
        }) => {
            let credential =
                ca::issue_node(&source(state_dir)?, &trust_domain, &node, lifetime, &out)?;
            println!(
                "wrote the credential of {} (serial {}, valid until {}) to {}",
                identity::node_id(&trust_domain, &node),
                credential.facts.serial,
                identity::x509::rfc3339(credential.facts.not_after),
                out.display()
            );
            Ok(())
        }
        None => {
            let settings = ca::Settings {
                source: source(args.state_dir)?,
                listen: args.listen.expect("clap requires --listen"),
                config: args.source.source(None),
                trust_domain,
                max_cert_lifetime: args.max_cert_lifetime,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(ca::run(settings))
        }
    }
}

fn show(q: QueryArgs, query: admin::Query) -> anyhow::Result<()> {
    let socket = admin::locate(q.socket, q.node.as_deref())?;
    let answer = admin::query(&socket, query.clone())?;
    if let Some(error) = answer.get("error") {
        anyhow::bail!("the agent answered: {error}");
    }
    cli::print(&query, &answer, q.output);
    Ok(())
}

fn graph(
    agents: Agents,
    format: viz::graph::Format,
    file: Option<PathBuf>,
    window: Duration,
) -> anyhow::Result<()> {
    use viz::graph::{self, Format};
    let edges = viz::fetch(&agents.sockets()?, window)?;
    let calls = graph::calls(&edges);
    let text = match format {
        Format::Table => {
            if file.is_some() {
                anyhow::bail!(
                    "--output FILE takes -o json, dot or svg (a table goes to the terminal)"
                );
            }
            graph::print_table(&calls);
            return Ok(());
        }
        Format::Json => serde_json::to_string_pretty(&calls)? + "\n",
        Format::Dot => graph::dot(&calls),
        Format::Svg => viz::svg::render(&calls),
    };
    match file {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("writing the graph to {}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// `-H 'name: value'`, as curl takes them.
fn parse_headers(headers: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((name, value)) => Ok((name.trim().to_owned(), value.trim().to_owned())),
            None => anyhow::bail!("header `{h}` is not `name: value`"),
        })
        .collect()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 10s, 5m, 1h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    })
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("`{s}` is not an IPv4 CIDR like 10.96.0.0/16");
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(format!("`{s}`: the prefix must be between /8 and /30"));
    }
    Ok((ip.parse().map_err(|_| bad())?, len))
}
