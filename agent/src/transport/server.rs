//! The destination's side of HBONE: authenticates the calling workload by
//! its certificate, then hands every admitted `CONNECT` stream to the
//! proxy's inbound path. Nothing here falls back to plaintext: a handshake
//! that fails closes the connection, with a log line that says why.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::resume::{self, Registry, Resumable, ResumeId, ResumeRefused};
use super::{
    parse_forwarded_for, tls, Tunnel, CONNECTION_WINDOW, FORWARDED, MAX_STREAMS, STREAM_WINDOW,
};
use crate::identity::{Identities, SpiffeId};
use crate::lifecycle::drain::until_drained;
use crate::workers::{Acceptor, Workers};

/// A TLS handshake must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A stream the caller asks for, authenticated.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    /// The calling workload, from its certificate.
    pub peer: SpiffeId,
    /// The calling workload's address (`Forwarded: for=`), not yet checked
    /// against `peer`: that needs the configuration.
    pub source: IpAddr,
    /// The original destination.
    pub to: SocketAddr,
    /// The caller agent's address.
    pub remote: SocketAddr,
}

/// Why a stream is refused: the status and reason go back to the caller.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

/// The proxy's inbound side, as the transport sees it.
pub trait Inbound: Send + Sync + 'static {
    type Admitted: Send + 'static;

    /// Decides on a stream before it is answered.
    fn admit(
        &self,
        request: &StreamRequest,
    ) -> impl Future<Output = Result<Self::Admitted, Refusal>> + Send;

    /// Serves an admitted stream to its end; `resume` is set when the
    /// caller asked for a resumable stream.
    fn serve(
        self: Arc<Self>,
        admitted: Self::Admitted,
        tunnel: Tunnel,
        resume: Option<Resumable>,
    ) -> impl Future<Output = ()> + Send;
}

/// Accepts HBONE connections on `listener` for as long as it runs, each
/// served on one of `workers`; `registry` holds this agent's resumable
/// streams.
pub async fn serve<I: Inbound>(
    listener: TcpListener,
    identities: Arc<Identities>,
    inbound: Arc<I>,
    registry: Arc<Registry>,
    drain: watch::Receiver<bool>,
    workers: Arc<Workers>,
) {
    let Some(listener) = Acceptor::polled(listener, &"HBONE") else {
        return;
    };
    loop {
        let (tcp, remote) = match listener.accept().await {
            // The listener is dual-stack: show IPv4 callers as such.
            Ok((tcp, remote)) => (
                tcp,
                SocketAddr::new(remote.ip().to_canonical(), remote.port()),
            ),
            Err(e) => {
                log::warn!("HBONE listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (identities, inbound, drain) = (identities.clone(), inbound.clone(), drain.clone());
        let registry = registry.clone();
        workers.serve(tcp, remote, move |tcp| async move {
            match connection(tcp, remote, &identities, inbound, registry, drain).await {
                Err(Failure::Refused(reason)) => {
                    log::warn!("HBONE connection from {remote} refused: {reason}")
                }
                Err(Failure::Ended(e)) => log::debug!("HBONE connection from {remote} ended: {e}"),
                Ok(()) => {}
            }
        });
    }
}

/// How an accepted connection failed: refused before any stream (logged
/// with the reason), or ended with an error once serving.
enum Failure {
    Refused(String),
    Ended(hyper::Error),
}

async fn connection<I: Inbound>(
    tcp: TcpStream,
    remote: SocketAddr,
    identities: &Arc<Identities>,
    inbound: Arc<I>,
    registry: Arc<Registry>,
    drain: watch::Receiver<bool>,
) -> Result<(), Failure> {
    let (tls, peer) = authenticate(tcp, identities)
        .await
        .map_err(Failure::Refused)?;
    let service = service_fn(move |request| {
        let (inbound, peer, registry) = (inbound.clone(), peer.clone(), registry.clone());
        async move {
            let caller = Caller {
                peer: &peer,
                remote,
                registry: &registry,
            };
            Ok::<_, Infallible>(caller.answer(&inbound, request).await)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .serve_connection(TokioIo::new(tls), service);
    // A GOAWAY when the agent drains: the caller opens new streams elsewhere.
    until_drained(conn, drain, Duration::ZERO, |c| c.graceful_shutdown())
        .await
        .map_err(Failure::Ended)
}

/// The TLS handshake, and the calling workload's identity from its
/// certificate; or why the caller is refused.
async fn authenticate(
    tcp: TcpStream,
    identities: &Arc<Identities>,
) -> Result<(TlsStream<TcpStream>, SpiffeId), String> {
    let _ = tcp.set_nodelay(true);
    let (config, check) = tls::server_config(identities).map_err(|e| e.to_string())?;
    let handshake = TlsAcceptor::from(config).accept(tcp);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    match (handshake, check.take()) {
        (Ok(Ok(tls)), Some(Ok(peer))) => Ok((tls, peer)),
        // Refused by the verifier: its reason, not the alert's.
        (Ok(_), Some(Err(why))) => Err(format!("TLS handshake: {why}")),
        (Ok(Err(e)), _) => Err(format!("TLS handshake: {e}")),
        (Ok(Ok(_)), None) => Err("TLS handshake: no client certificate".to_owned()),
        (Err(_), _) => Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")),
    }
}

/// Who sent a request on an authenticated connection.
struct Caller<'a> {
    peer: &'a SpiffeId,
    remote: SocketAddr,
    registry: &'a Arc<Registry>,
}

/// What the `nodemesh-resume` request header asks for.
enum Resume {
    No,
    New,
    Stream(ResumeId),
}

impl Caller<'_> {
    /// What was asked, as logged: `stream from <peer> (<remote>) to ...`.
    fn what(&self, kind: &str, detail: &str) -> String {
        format!("{kind} from {} ({}){detail}", self.peer, self.remote)
    }

    /// Answers one request: a `CONNECT` (a new stream, or one resumed), or
    /// a quiesce of a resumable stream.
    async fn answer<I: Inbound>(
        &self,
        inbound: &Arc<I>,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let answered = match resume_asked(&request) {
            Err(refusal) => Err((self.what("request", ""), refusal)),
            Ok(_) if request.method() == Method::POST => self.quiesce(&request).await,
            Ok(Resume::Stream(id)) => self.resume(id, request),
            Ok(resume) => self.stream(inbound, request, resume).await,
        };
        answered.unwrap_or_else(|(what, refusal)| {
            log::warn!("HBONE {what} refused: {}", refusal.reason);
            let mut response = Response::new(Full::new(Bytes::from(refusal.reason)));
            *response.status_mut() = refusal.status;
            response
        })
    }

    /// A new stream: 200 and it goes to the inbound path, or the refusal.
    async fn stream<I: Inbound>(
        &self,
        inbound: &Arc<I>,
        mut request: Request<Incoming>,
        resume: Resume,
    ) -> Answer {
        let what = || self.what("stream", &format!(" to {}", request.uri()));
        let asked = parse(self.peer, self.remote, &request).map_err(|r| (what(), r))?;
        let admitted = inbound.admit(&asked).await.map_err(|r| (what(), r))?;
        let resumable =
            matches!(resume, Resume::New).then(|| self.registry.open(self.peer, self.remote.ip()));
        let mut response = Response::new(Full::default());
        if let Some(resumable) = &resumable {
            let id = resumable.id.to_string();
            let value = http::HeaderValue::from_str(&id).expect("hex is a header value");
            response.headers_mut().insert(resume::RESUME_ID, value);
        }
        let upgrade = hyper::upgrade::on(&mut request);
        let inbound = inbound.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let tunnel = Tunnel::new(upgraded, None);
                    // Boxed: kilobytes of state, allocated only once the
                    // stream is up, instead of in every spawned task.
                    Box::pin(inbound.serve(admitted, tunnel, resumable)).await
                }
                Err(e) => log::debug!("HBONE stream ended before it started: {e}"),
            }
        });
        Ok(response)
    }

    /// A quiesced stream resumed: the new stream goes to the relay that
    /// parked its application socket.
    fn resume(&self, id: ResumeId, mut request: Request<Incoming>) -> Answer {
        let what = || self.what("resume", &format!(" of stream {id}"));
        if request.method() != Method::CONNECT {
            return Err((what(), not_connect(&request)));
        }
        let parked = self
            .registry
            .attach(id, self.peer, self.remote.ip())
            .map_err(|e| (what(), resume_refused(e)))?;
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    if parked.send(Tunnel::new(upgraded, None)).is_err() {
                        log::debug!("stream {id} ended before it was resumed");
                    }
                }
                Err(e) => log::debug!("HBONE stream {id} ended before it resumed: {e}"),
            }
        });
        log::info!("HBONE stream {id} from {} resumed", self.peer);
        Ok(Response::new(Full::default()))
    }

    /// `POST /nodemesh/quiesce`: stops the stream's relay reading the
    /// application; answers with the bytes it wrote into the stream.
    async fn quiesce(&self, request: &Request<Incoming>) -> Answer {
        let what = || self.what("quiesce", "");
        let bad = |reason: &str| (what(), refusal(StatusCode::BAD_REQUEST, reason.into()));
        if request.uri().path() != resume::QUIESCE_PATH {
            return Err(bad("unknown path"));
        }
        let Resume::Stream(id) = resume_asked(request).map_err(|r| (what(), r))? else {
            return Err(bad("no stream named (nodemesh-resume: <id>)"));
        };
        let sent = header(request, resume::SENT)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad("no byte count (nodemesh-sent)"))?;
        let ours = self
            .registry
            .quiesce(id, self.peer, self.remote.ip(), sent)
            .await
            .map_err(|e| (what(), forbidden(e.to_string())))?;
        let mut response = Response::new(Full::default());
        response
            .headers_mut()
            .insert(resume::SENT, http::HeaderValue::from(ours));
        Ok(response)
    }
}

/// A response, or what was refused and why.
type Answer = Result<Response<Full<Bytes>>, (String, Refusal)>;

fn refusal(status: StatusCode, reason: String) -> Refusal {
    Refusal { status, reason }
}

fn forbidden(reason: String) -> Refusal {
    refusal(StatusCode::FORBIDDEN, reason)
}

/// 404 for an id unknown here (a stream whose application socket is still
/// on its way from the previous agent is, for a moment), 403 otherwise.
fn resume_refused(refused: ResumeRefused) -> Refusal {
    match refused {
        ResumeRefused::Unknown => refusal(StatusCode::NOT_FOUND, refused.to_string()),
        _ => forbidden(refused.to_string()),
    }
}

fn not_connect(request: &Request<Incoming>) -> Refusal {
    refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not CONNECT", request.method()),
    )
}

fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

fn resume_asked(request: &Request<Incoming>) -> Result<Resume, Refusal> {
    match header(request, resume::RESUME) {
        None => Ok(Resume::No),
        Some("new") => Ok(Resume::New),
        Some(id) => id.parse().map(Resume::Stream).map_err(|_| {
            refusal(
                StatusCode::BAD_REQUEST,
                format!("{id:?} is not a resume id"),
            )
        }),
    }
}

fn parse(
    peer: &SpiffeId,
    remote: SocketAddr,
    request: &Request<Incoming>,
) -> Result<StreamRequest, Refusal> {
    let bad = |reason: String| Refusal {
        status: StatusCode::BAD_REQUEST,
        reason,
    };
    if request.method() != Method::CONNECT {
        return Err(not_connect(request));
    }
    let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let to = authority
        .parse::<SocketAddr>()
        .map_err(|_| bad(format!("{authority:?} is not an ip:port")))?;
    let source = request
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for)
        .ok_or_else(|| bad("no caller address (Forwarded: for=...)".to_owned()))?;
    Ok(StreamRequest {
        peer: peer.clone(),
        source,
        to,
        remote,
    })
}
