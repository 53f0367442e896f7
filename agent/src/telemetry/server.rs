//! The metrics port (`--metrics-addr`): `GET /metrics` in Prometheus' text exposition
//! format (version 0.0.4), and the probes Kubernetes asks on the same port:
//! `GET /healthz/live` (the agent answers) and `GET /healthz/ready` (it serves the node).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Renders every metric at scrape time and says whether the agent serves; implemented by
/// the running agent.
pub trait Scrape: Send + Sync + 'static {
    fn scrape(&self) -> String;
    /// `Err(why not)` while the agent does not serve the node (first config not applied,
    /// handing the node over): traffic meant for it should not count on it yet.
    fn readiness(&self) -> Result<(), String>;
}

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` (a clear error if taken), then serves it until aborted.
///
/// With `SO_REUSEPORT`, so that during a hand-over the next agent listens
/// beside the draining one (scrapes reach either until it exits).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bound = (|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(128)?;
        TcpListener::from_std(socket.into())
    })();
    bound.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("metrics endpoint {addr} (--metrics-addr): {e}"),
        )
    })
}

pub async fn serve(listener: TcpListener, source: Arc<dyn Scrape>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let source = source.clone();
                async move {
                    let response = answer(&*source, request.method(), request.uri().path());
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(source: &dyn Scrape, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" | "/healthz/live" | "/healthz/ready" if method != Method::GET => {
            (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned())
        }
        "/metrics" => (StatusCode::OK, source.scrape()),
        // Answering at all is liveness: the runtime serving this also serves traffic.
        "/healthz/live" => (StatusCode::OK, "live\n".to_owned()),
        "/healthz/ready" => match source.readiness() {
            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics, probes at /healthz/live and /healthz/ready\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let content_type = if status == StatusCode::OK && path == "/metrics" {
        CONTENT_TYPE
    } else {
        "text/plain"
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    struct Agent(Result<(), String>);

    impl Scrape for Agent {
        fn scrape(&self) -> String {
            "nodemesh_up 1\n".to_owned()
        }
        fn readiness(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    async fn get(agent: &Agent, method: Method, path: &str) -> (StatusCode, String, String) {
        let response = answer(agent, &method, path);
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn probes_say_live_always_and_ready_only_when_the_agent_serves() {
        let serving = Agent(Ok(()));
        let starting = Agent(Err("first configuration not applied yet".to_owned()));
        for agent in [&serving, &starting] {
            let (status, _, body) = get(agent, Method::GET, "/healthz/live").await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "live\n"));
        }
        let (status, _, body) = get(&serving, Method::GET, "/healthz/ready").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));
        let (status, _, body) = get(&starting, Method::GET, "/healthz/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready: first configuration not applied yet\n");
    }

    #[tokio::test]
    async fn metrics_keep_their_content_type_and_other_requests_are_refused() {
        let agent = Agent(Ok(()));
        let (status, content_type, body) = get(&agent, Method::GET, "/metrics").await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, CONTENT_TYPE)
        );
        assert_eq!(body, "nodemesh_up 1\n");
        let (status, content_type, _) = get(&agent, Method::POST, "/healthz/ready").await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain")
        );
        let (status, _, body) = get(&agent, Method::GET, "/healthz").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/healthz/ready"), "{body}");
    }
}
