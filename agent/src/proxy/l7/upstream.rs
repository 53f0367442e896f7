//! Connections from the proxy to endpoints, pooled per calling workload: a
//! connection opened for one workload is never reused for another, since
//! it carries that workload's identity (its namespace and address).
//!
//! HTTP/1.1 connections carry one request at a time and return to the pool
//! once the response has been read to its end; HTTP/2 connections are shared
//! by all concurrent requests to one endpoint.
//!
//! Every connection, idle in the pool or busy, holds a descriptor charged to
//! the workload that owns the pool; without one left, the request fails as a
//! connection failure and the workload's rejection is counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::{self, Body, Guarded};
use crate::proxy::hop::{self, HopIn};
use crate::proxy::peer::{self, Charged};
use crate::proxy::Proxy;
use crate::proxy::{Direction, Pod};
use crate::routing::UpstreamTls;
use crate::workers;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// Idle connections are closed after this long unless the DestinationRule
/// says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/2 flow control towards endpoints (hyper's defaults are 2 MiB per
/// stream and 5 MiB per connection, buffered per stalled caller).
const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 * 1024;
const UPSTREAM_H2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
const UPSTREAM_H2_SEND_BUFFER: usize = 64 * 1024;

/// How to talk to one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub addr: SocketAddr,
    /// DestinationRule `tls` for the endpoint's subset and port.
    pub tls: UpstreamTls,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(std::io::Error),
    /// The calling workload has no descriptor left for a new connection:
    /// its own limit, which says nothing about the endpoint's health.
    #[error("no descriptor for a new connection: {0}")]
    NoDescriptor(String),
    /// The request failed on a connection taken from the pool, before any
    /// response: the endpoint closed it while idle. Safe to try again.
    #[error("pooled connection closed: {0}")]
    Stale(hyper::Error),
    #[error("reset before response: {0}")]
    Reset(hyper::Error),
}

struct Idle {
    send: http1::SendRequest<Body>,
    since: Instant,
    used: u32,
}

/// The connection pool of one calling workload, by endpoint and hop: a
/// connection opened over HBONE never carries a request that policy now
/// sends in plaintext, nor the other way round.
#[derive(Default)]
pub struct Pool {
    http1: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    http2: Mutex<HashMap<PoolKey, http2::SendRequest<Body>>>,
}

/// An endpoint, the hop ([`HopIn::name`]) its connections take, and the
/// worker that drives them ([`workers::current`]).
type PoolKey = (SocketAddr, &'static str, Option<usize>);

/// A connection on its way back to the pool once its response ends.
struct Returning {
    pool: Arc<Pool>,
    key: PoolKey,
    send: http1::SendRequest<Body>,
    used: u32,
    max_requests: u32,
}

impl Pool {
    /// Sends `request` on a pooled connection to `dial.addr`, or a new one;
    /// `opening` is set to the time a new one took to open (and stays zero
    /// on a pooled one): not the endpoint's latency.
    pub async fn send(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        from: &Pod,
        dial: Dial,
        request: Request<Body>,
        opening: &mut Duration,
    ) -> Result<Response<Body>, UpstreamError> {
        let config = proxy.config.current();
        let hop = hop::choose_in(proxy, &config, dial.addr, dial.tls)
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        let to = Connecting { proxy, from, hop };
        if dial.http2 {
            self.send_http2(to, dial, request, opening).await
        } else {
            self.send_http1(to, dial, request, opening).await
        }
    }

    fn take_idle(&self, key: &PoolKey, dial: &Dial) -> Option<Idle> {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.get_mut(key)?;
        while let Some(conn) = conns.pop() {
            if conn.send.is_ready() && conn.since.elapsed() < dial.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    async fn send_http1(
        self: &Arc<Self>,
        to: Connecting<'_>,
        dial: Dial,
        request: Request<Body>,
        opening: &mut Duration,
    ) -> Result<Response<Body>, UpstreamError> {
        let key = (dial.addr, to.hop.name(), workers::current());
        let (mut send, used, reused) = match self.take_idle(&key, &dial) {
            Some(idle) => (idle.send, idle.used, true),
            None => {
                let started = Instant::now();
                let send = Box::pin(to.open_http1(&dial)).await?;
                *opening = started.elapsed();
                (send, 0, false)
            }
        };
        let response = match send.send_request(request).await {
            Ok(response) => response,
            Err(e) if reused && (e.is_canceled() || e.is_incomplete_message()) => {
                return Err(UpstreamError::Stale(e))
            }
            Err(e) => return Err(UpstreamError::Reset(e)),
        };
        let returning = Returning {
            pool: self.clone(),
            key,
            send,
            used: used + 1,
            max_requests: dial.max_requests_per_connection,
        };
        Ok(response.map(|b| Guarded::wrap(body::incoming(b), returning, Returning::give_back)))
    }

    async fn send_http2(
        &self,
        to: Connecting<'_>,
        dial: Dial,
        request: Request<Body>,
        opening: &mut Duration,
    ) -> Result<Response<Body>, UpstreamError> {
        let key = (dial.addr, to.hop.name(), workers::current());
        let existing = self
            .http2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|s| !s.is_closed())
            .cloned();
        let (mut send, reused) = match existing {
            Some(send) => (send, true),
            None => {
                let started = Instant::now();
                let send = Box::pin(to.open_http2(&dial)).await?;
                self.http2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, send.clone());
                *opening = started.elapsed();
                (send, false)
            }
        };
        match send.send_request(request).await {
            Ok(response) => Ok(response.map(body::incoming)),
            Err(e) if reused && e.is_canceled() => Err(UpstreamError::Stale(e)),
            Err(e) => Err(UpstreamError::Reset(e)),
        }
    }
}

/// What a new connection needs: who opens it and over which hop.
///
/// Opening one awaits a TLS handshake and an HBONE stream: kilobytes of
/// future state that every request's future would carry (and tokio copy
/// when hyper spawns an HTTP/2 request) if it were awaited inline, so the
/// pool awaits it boxed.
struct Connecting<'a> {
    proxy: &'a Arc<Proxy>,
    from: &'a Pod,
    hop: HopIn<'a>,
}

impl Connecting<'_> {
    /// A new HTTP/1.1 connection, driven by a task of its own.
    async fn open_http1(self, dial: &Dial) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = TokioIo::new(self.connect(dial).await?);
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// A new HTTP/2 connection, driven by a task of its own.
    async fn open_http2(self, dial: &Dial) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let io = TokioIo::new(self.connect(dial).await?);
        // Windows as small as the downstream side's: what an endpoint may
        // push ahead of a caller that does not read.
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(UPSTREAM_H2_STREAM_WINDOW)
            .initial_connection_window_size(UPSTREAM_H2_CONNECTION_WINDOW)
            .max_send_buf_size(UPSTREAM_H2_SEND_BUFFER)
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// A new connection to the endpoint, on a descriptor charged to `from`.
    async fn connect(self, dial: &Dial) -> Result<Charged, UpstreamError> {
        let from = self.from;
        let fd = from.tenant.charge(1, None).map_err(|refused| {
            from.tenant.count_rejection(Direction::Outbound);
            UpstreamError::NoDescriptor(refused.to_string())
        })?;
        peer::connect(
            self.proxy,
            from,
            dial.addr,
            self.hop.to_hop(),
            dial.connect_timeout,
            fd,
        )
        .await
        .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))
    }
}

fn handshake_failed(e: hyper::Error) -> UpstreamError {
    UpstreamError::Connect(std::io::Error::other(e))
}

impl Returning {
    fn give_back(self) {
        if self.send.is_closed() || (self.max_requests > 0 && self.used >= self.max_requests) {
            return;
        }
        let mut idle = self.pool.http1.lock().unwrap_or_else(|e| e.into_inner());
        let conns = idle.entry(self.key).or_default();
        if conns.len() < MAX_IDLE_PER_ENDPOINT {
            conns.push(Idle {
                send: self.send,
                since: Instant::now(),
                used: self.used,
            });
        }
    }
}
