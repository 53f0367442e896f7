//! Access logs: one line per HTTP request and per TCP connection, in
//! Envoy's default text format or as JSON, on the agent's stdout.
//!
//! The request path only captures what it must (a few request headers,
//! only when the workload's Telemetry asks for logs) and hands a line's
//! data to a bounded queue; one writer thread resolves workloads and
//! principals, formats and writes. A full queue drops the line and counts
//! it (`nodemesh_access_log_dropped_total`): a slow stdout never slows or
//! fails a request.
//!
//! No secrets: no header is logged but `User-Agent`, `X-Request-Id`,
//! `X-Forwarded-For` and the authority (without any `user:password@`); the
//! path is logged without its query string, where tokens and keys travel;
//! the trace id is read from `traceparent` (or `x-b3-traceid`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::request::Parts;
use http::Version;
use serde_json::{json, Value};

use super::peer::Peer;
use super::policy::{AccessLog, Format};
use super::standard::{self, ConnectionDone, Reporter, RequestDone};
use crate::config::{Config, ConfigStore};

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

/// What is kept of a request's head, for its line.
#[derive(Debug)]
pub struct Head {
    start: SystemTime,
    method: http::Method,
    /// Without the query string.
    path: Box<str>,
    version: Version,
    authority: Option<Box<str>>,
    user_agent: Option<Box<str>>,
    request_id: Option<Box<str>>,
    forwarded_for: Option<Box<str>>,
    trace_id: Option<Box<str>>,
}

impl Head {
    pub fn capture(parts: &Parts) -> Head {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(Box::<str>::from)
        };
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().into())
            .or_else(|| header("host"))
            .map(|a| match a.rsplit_once('@') {
                Some((_, host)) => host.into(),
                None => a,
            });
        Head {
            start: SystemTime::now(),
            method: parts.method.clone(),
            path: parts.uri.path().into(),
            version: parts.version,
            authority,
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            forwarded_for: header("x-forwarded-for"),
            trace_id: trace_id(&parts.headers),
        }
    }
}

/// The trace id of W3C `traceparent` (`00-<trace id>-<span id>-<flags>`),
/// else of B3's `x-b3-traceid`.
fn trace_id(headers: &http::HeaderMap) -> Option<Box<str>> {
    let hex = |s: &str, len: &[usize]| {
        len.contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_hexdigit())
            && s.bytes().any(|b| b != b'0')
    };
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let w3c = get("traceparent").and_then(|v| v.split('-').nth(1));
    w3c.filter(|id| hex(id, &[32]))
        .or_else(|| get("x-b3-traceid").filter(|id| hex(id, &[16, 32])))
        .map(Box::from)
}

/// A request's line, once its response ended.
#[derive(Debug)]
pub struct HttpLine {
    pub head: Head,
    pub done: RequestDone,
    /// The endpoint that answered (none: the proxy answered itself).
    pub upstream: Option<SocketAddr>,
    /// From the request's start to the upstream's response head.
    pub upstream_service_time: Option<Duration>,
    pub route: Option<Box<str>>,
}

/// A TCP connection's line, once it closed.
#[derive(Debug)]
pub struct TcpLine {
    pub start: SystemTime,
    pub duration: Duration,
    pub done: ConnectionDone,
}

#[derive(Debug)]
enum Line {
    Http(Box<HttpLine>),
    Tcp(Box<TcpLine>),
}

struct Queued {
    line: Line,
    log: Arc<AccessLog>,
}

/// See the module documentation.
pub struct AccessLogger {
    config: Arc<ConfigStore>,
    trust_domain: Arc<str>,
    /// Started with the first line, so that an agent that never logs has no
    /// writer thread.
    queue: OnceLock<Option<SyncSender<Queued>>>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
}

impl AccessLogger {
    pub fn new(config: Arc<ConfigStore>, trust_domain: &str) -> AccessLogger {
        AccessLogger {
            config,
            trust_domain: trust_domain.into(),
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues a request's line, unless the policy's filter leaves it out.
    pub fn http(&self, log: &Arc<AccessLog>, line: HttpLine) {
        if log
            .filter
            .as_ref()
            .is_some_and(|f| !f.matches(line.done.code))
        {
            return;
        }
        self.send(log, Line::Http(Box::new(line)));
    }

    /// Queues a connection's line. A filter on `response.code` never
    /// matches a TCP connection, which has none (as in Envoy).
    pub fn tcp(&self, log: &Arc<AccessLog>, line: TcpLine) {
        if log.filter.is_none() {
            self.send(log, Line::Tcp(Box::new(line)));
        }
    }

    fn send(&self, log: &Arc<AccessLog>, line: Line) {
        let queue = self.queue.get_or_init(|| self.start_writer());
        let queued = Queued {
            line,
            log: log.clone(),
        };
        match queue.as_ref().map(|q| q.try_send(queued)) {
            Some(Ok(())) => {}
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn start_writer(&self) -> Option<SyncSender<Queued>> {
        let (send, receive) = mpsc::sync_channel(QUEUE);
        let writer = Writer {
            config: self.config.clone(),
            trust_domain: self.trust_domain.clone(),
            written: self.written.clone(),
        };
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(receive));
        match started {
            Ok(_) => Some(send),
            Err(e) => {
                log::error!("cannot start the access-log writer, access logs are dropped: {e}");
                None
            }
        }
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

struct Writer {
    config: Arc<ConfigStore>,
    trust_domain: Arc<str>,
    written: Arc<AtomicU64>,
}

impl Writer {
    /// Writes lines as they come, flushing whenever the queue is empty.
    fn run(self, queue: Receiver<Queued>) {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
        let mut text = String::with_capacity(1024);
        while let Ok(mut queued) = queue.recv() {
            loop {
                let config = self.config.current();
                for format in queued.log.formats.iter() {
                    text.clear();
                    render(
                        &config,
                        &self.trust_domain,
                        &queued.line,
                        *format,
                        &mut text,
                    );
                    text.push('\n');
                    if out.write_all(text.as_bytes()).is_ok() {
                        self.written.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match queue.try_recv() {
                    Ok(next) => queued = next,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let _ = out.flush();
        }
    }
}

/// The fields both formats print, in the order of the text format.
struct Fields<'a> {
    start: SystemTime,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: Option<&'static str>,
    code: u16,
    flags: String,
    received: u64,
    sent: u64,
    duration: Duration,
    upstream_service_time: Option<Duration>,
    forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    authority: Option<&'a str>,
    upstream: Option<SocketAddr>,
    route: Option<&'a str>,
    trace_id: Option<&'a str>,
}

fn render(config: &Config, trust_domain: &str, line: &Line, format: Format, out: &mut String) {
    let (fields, edge) = match line {
        Line::Http(l) => (
            Fields {
                start: l.head.start,
                method: Some(l.head.method.as_str()),
                path: Some(&l.head.path),
                protocol: Some(match l.head.version {
                    Version::HTTP_09 => "HTTP/0.9",
                    Version::HTTP_10 => "HTTP/1.0",
                    Version::HTTP_2 => "HTTP/2",
                    Version::HTTP_3 => "HTTP/3",
                    _ => "HTTP/1.1",
                }),
                code: l.done.code,
                flags: l.done.flags.render(),
                received: l.done.request_bytes,
                sent: l.done.response_bytes,
                duration: l.done.duration,
                upstream_service_time: l.upstream_service_time,
                forwarded_for: l.head.forwarded_for.as_deref(),
                user_agent: l.head.user_agent.as_deref(),
                request_id: l.head.request_id.as_deref(),
                authority: l.head.authority.as_deref(),
                upstream: l.upstream,
                route: l.route.as_deref(),
                trace_id: l.head.trace_id.as_deref(),
            },
            &l.done.edge,
        ),
        Line::Tcp(l) => (
            Fields {
                start: l.start,
                method: None,
                path: None,
                protocol: None,
                code: 0,
                flags: l.done.flags.render(),
                received: l.done.received,
                sent: l.done.sent,
                duration: l.duration,
                upstream_service_time: None,
                forwarded_for: None,
                user_agent: None,
                request_id: None,
                authority: None,
                upstream: Some(l.done.edge.destination),
                route: None,
                trace_id: None,
            },
            &l.done.edge,
        ),
    };
    let (source, destination, service) = standard::peers(config, trust_domain, edge);
    let service =
        service.map(|s| format!("{}.{}.svc.{}", s.name, s.namespace, config.cluster_domain()));
    let cluster = match edge.reporter {
        Reporter::Source => match (&service, edge.service) {
            (Some(host), Some(addr)) => format!("outbound|{}||{host}", addr.port()),
            _ => "PassthroughCluster".to_owned(),
        },
        Reporter::Destination => format!("inbound|{}||", edge.destination.port()),
    };
    match format {
        Format::Text => text(&fields, &cluster, edge.source, out),
        Format::Json => {
            let peers = Peers {
                reporter: edge.reporter,
                source: &source,
                destination: &destination,
                service: service.as_deref(),
            };
            json_line(&fields, &cluster, edge.source, &peers, out)
        }
    }
}

/// Envoy's `%START_TIME%`: `2026-12-02T09:20:01.123Z`.
fn start_time(at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i128;
    match time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => "-".to_owned(),
    }
}

/// Appends `value`, `-` when unset, escaped so that no request can forge a
/// line or a field (quotes, backslashes, control characters).
fn field(out: &mut String, value: Option<&str>) {
    match value.filter(|v| !v.is_empty()) {
        None => out.push('-'),
        Some(v) => {
            for c in v.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if c.is_control() => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
        }
    }
}

/// Envoy's default format:
/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
/// %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
/// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
/// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"`, then as Istio's
/// `%UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% %ROUTE_NAME%`.
fn text(f: &Fields, cluster: &str, remote: Option<std::net::IpAddr>, out: &mut String) {
    let _ = write!(out, "[{}] \"", start_time(f.start));
    field(out, f.method);
    out.push(' ');
    field(out, f.path);
    out.push(' ');
    field(out, f.protocol);
    let _ = write!(out, "\" {} ", f.code);
    out.push_str(&f.flags);
    let _ = write!(
        out,
        " {} {} {} ",
        f.received,
        f.sent,
        f.duration.as_millis()
    );
    match f.upstream_service_time {
        Some(t) => {
            let _ = write!(out, "{}", t.as_millis());
        }
        None => out.push('-'),
    }
    for value in [f.forwarded_for, f.user_agent, f.request_id, f.authority] {
        out.push_str(" \"");
        field(out, value);
        out.push('"');
    }
    out.push_str(" \"");
    field(out, f.upstream.map(|u| u.to_string()).as_deref());
    out.push_str("\" ");
    field(out, Some(cluster));
    out.push(' ');
    field(out, remote.map(|ip| ip.to_string()).as_deref());
    out.push(' ');
    field(out, f.route);
}

struct Peers<'a> {
    reporter: Reporter,
    source: &'a Peer,
    destination: &'a Peer,
    service: Option<&'a str>,
}

fn json_line(
    f: &Fields,
    cluster: &str,
    remote: Option<std::net::IpAddr>,
    p: &Peers,
    out: &mut String,
) {
    let known = |v: &str| (v != super::peer::UNKNOWN).then(|| v.to_owned());
    let line: Value = json!({
        "start_time": start_time(f.start),
        "method": f.method,
        "path": f.path,
        "protocol": f.protocol,
        "response_code": f.code,
        "response_flags": f.flags,
        "bytes_received": f.received,
        "bytes_sent": f.sent,
        "duration": f.duration.as_millis() as u64,
        "upstream_service_time": f.upstream_service_time.map(|t| t.as_millis() as u64),
        "x_forwarded_for": f.forwarded_for,
        "user_agent": f.user_agent,
        "request_id": f.request_id,
        "authority": f.authority,
        "upstream_host": f.upstream.map(|u| u.to_string()),
        "upstream_cluster": cluster,
        "downstream_remote_address": remote.map(|ip| ip.to_string()),
        "route_name": f.route,
        "trace_id": f.trace_id,
        "reporter": match p.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        },
        "source_workload": known(&p.source.workload),
        "source_namespace": known(&p.source.namespace),
        "source_principal": known(&p.source.principal),
        "destination_workload": known(&p.destination.workload),
        "destination_namespace": known(&p.destination.namespace),
        "destination_principal": known(&p.destination.principal),
        "destination_service": p.service,
    });
    out.push_str(&line.to_string());
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::telemetry::flags::{Flag, ResponseFlags};
    use crate::telemetry::standard::EdgeKey;

    fn request(headers: &[(&str, &str)], uri: &str) -> Parts {
        let mut builder = http::Request::builder().method("POST").uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn edge(reporter: Reporter) -> EdgeKey {
        EdgeKey {
            reporter,
            source: Some(IpAddr::from([10, 0, 0, 1])),
            destination: SocketAddr::from(([10, 0, 0, 2], 9080)),
            service: None,
            mutual_tls: true,
        }
    }

    fn line(parts: &Parts) -> Line {
        let mut head = Head::capture(parts);
        head.start = UNIX_EPOCH + Duration::from_millis(1_764_667_201_123);
        Line::Http(Box::new(HttpLine {
            head,
            done: RequestDone {
                edge: edge(Reporter::Destination),
                grpc: false,
                code: 503,
                grpc_status: None,
                flags: ResponseFlags::of(Flag::FaultInjected),
                duration: Duration::from_millis(12),
                request_bytes: 5,
                response_bytes: 18,
            },
            upstream: Some(SocketAddr::from(([10, 0, 0, 2], 9080))),
            upstream_service_time: Some(Duration::from_millis(10)),
            route: Some("jason".into()),
        }))
    }

    fn rendered(line: &Line, format: Format) -> String {
        let mut out = String::new();
        render(&Config::empty(), "cluster.local", line, format, &mut out);
        out
    }

    const SECRETS: &[(&str, &str)] = &[
        ("authorization", "Bearer secret-xyz"),
        ("cookie", "session=secret-cookie"),
        ("x-api-key", "secret-key"),
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "req-1"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];

    #[test]
    fn text_is_envoys_default_format() {
        let parts = request(SECRETS, "http://reviews:9080/reviews/0?token=secret-q");
        let text = rendered(&line(&parts), Format::Text);
        assert_eq!(
            text,
            "[2025-12-02T09:20:01.123Z] \"POST /reviews/0 HTTP/1.1\" 503 FI 5 18 12 10 \"-\" \
             \"curl/8.5.0\" \"req-1\" \"reviews:9080\" \"10.0.0.2:9080\" inbound|9080|| \
             10.0.0.1 jason"
        );
    }

    #[test]
    fn json_has_the_debugging_fields() {
        let parts = request(SECRETS, "/reviews/0?token=secret-q");
        let json: Value = serde_json::from_str(&rendered(&line(&parts), Format::Json)).unwrap();
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/reviews/0");
        assert_eq!(json["response_code"], 503);
        assert_eq!(json["response_flags"], "FI");
        assert_eq!(json["duration"], 12);
        assert_eq!(json["upstream_service_time"], 10);
        assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(json["request_id"], "req-1");
        assert_eq!(json["route_name"], "jason");
        assert_eq!(json["reporter"], "destination");
        assert_eq!(json["authority"], Value::Null);
    }

    #[test]
    fn no_secret_reaches_a_line() {
        let parts = request(
            SECRETS,
            "http://user:secret-pw@reviews:9080/r?access_token=secret-q",
        );
        for format in [Format::Text, Format::Json] {
            let out = rendered(&line(&parts), format);
            assert!(!out.contains("secret"), "{out}");
            assert!(out.contains("reviews:9080"), "{out}");
        }
    }

    #[test]
    fn a_request_cannot_forge_a_line() {
        let parts = request(&[("user-agent", "a\" \"b")], "/x");
        let mut head = Head::capture(&parts);
        head.user_agent = Some("evil\n[2025-01-01] \"GET / HTTP/1.1\" 200".into());
        let mut out = String::new();
        field(&mut out, head.user_agent.as_deref());
        assert!(!out.contains('\n'), "{out}");
        assert_eq!(out.matches('"').count(), out.matches("\\\"").count());
    }

    #[test]
    fn tcp_lines_have_no_request() {
        let line = Line::Tcp(Box::new(TcpLine {
            start: UNIX_EPOCH,
            duration: Duration::from_millis(7),
            done: ConnectionDone {
                edge: edge(Reporter::Source),
                live: false,
                flags: ResponseFlags::NONE,
                received: 100,
                sent: 200,
            },
        }));
        assert_eq!(
            rendered(&line, Format::Text),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 - 100 200 7 - \"-\" \"-\" \"-\" \"-\" \
             \"10.0.0.2:9080\" PassthroughCluster 10.0.0.1 -"
        );
    }

    #[test]
    fn trace_ids_come_from_w3c_or_b3() {
        let id = |headers: &[(&str, &str)]| trace_id(&request(headers, "/").headers);
        assert_eq!(
            id(&[("x-b3-traceid", "80f198ee56343ba8")]).as_deref(),
            Some("80f198ee56343ba8")
        );
        assert_eq!(id(&[("traceparent", "00-0000-00-01")]), None);
        let zero = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
        assert_eq!(id(&[("traceparent", &zero)]), None);
    }
}
