//! `mesh-load`: an h2c (HTTP/2 with prior knowledge) load that behaves like
//! production clients across a server's graceful `GOAWAY`.
//!
//! ```text
//! mesh-load --rate 500 --duration 24 [--timeout 10] http://10.96.0.32/
//! ```
//!
//! GETs are paced at `--rate` per second for `--duration` seconds through
//! hyper-util's pooled client with its defaults: a request the connection
//! never carried (RFC 9113 §8.7: not processed, so not failed) is sent on a
//! new connection, as browsers, gRPC and Envoy do. Load tools built on a
//! bare h2 connection (oha) report such a request as an error instead, which
//! measures the client, not the server. No retry of its own is added.
//!
//! Prints one JSON document: `answered` (2xx), `failed` (other statuses,
//! errors and requests longer than `--timeout`), `errors` (text → count),
//! `longest_ms`, and `connections_opened` (distinct local addresses of the
//! connections that answered). Requests in flight when the duration ends are
//! awaited, not counted as failed.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpInfo;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::task::JoinSet;

struct Args {
    rate: u32,
    duration: Duration,
    timeout: Duration,
    url: Uri,
}

fn parse_args() -> Result<Args> {
    let seconds = |value: &str, flag: &str| -> Result<Duration> {
        Ok(Duration::from_secs_f64(
            value.parse().context(flag.to_owned())?,
        ))
    };
    let (mut rate, mut duration, mut timeout, mut url) =
        (None, None, Duration::from_secs(10), None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if !arg.starts_with("--") {
            url = Some(arg.parse::<Uri>().context("URL")?);
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--rate" => rate = Some(value.parse().context("--rate")?),
            "--duration" => duration = Some(seconds(&value, "--duration")?),
            "--timeout" => timeout = seconds(&value, "--timeout")?,
            _ => bail!("unknown flag {arg} (see the doc comment of tests/src/bin/mesh-load.rs)"),
        }
    }
    let rate: u32 = rate.context("--rate is required")?;
    ensure!(rate > 0, "--rate must be above 0");
    Ok(Args {
        rate,
        duration: duration.context("--duration is required")?,
        timeout,
        url: url.context("a URL is required")?,
    })
}

/// One request's outcome: its duration, and the answering connection's
/// local address or why it failed.
struct Outcome {
    took: Duration,
    result: Result<SocketAddr, String>,
}

#[derive(Default)]
struct Tally {
    answered: u64,
    longest: Duration,
    errors: BTreeMap<String, u64>,
    connections: BTreeSet<SocketAddr>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        self.longest = self.longest.max(outcome.took);
        match outcome.result {
            Ok(local) => {
                self.answered += 1;
                self.connections.insert(local);
            }
            Err(text) => *self.errors.entry(text).or_default() += 1,
        }
    }

    fn report(&self) -> serde_json::Value {
        json!({
            "answered": self.answered,
            "failed": self.errors.values().sum::<u64>(),
            "errors": self.errors,
            "longest_ms": self.longest.as_secs_f64() * 1000.0,
            "connections_opened": self.connections.len(),
        })
    }
}

/// An error with its sources, the way a user reads it ("client error
/// (SendRequest): connection closed").
fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / args.rate);
    let mut in_flight = JoinSet::new();
    let mut tally = Tally::default();
    let end = Instant::now() + args.duration;
    while Instant::now() < end {
        ticks.tick().await;
        let (client, url, timeout) = (client.clone(), args.url.clone(), args.timeout);
        in_flight.spawn(async move {
            let began = Instant::now();
            let request = Request::get(url)
                .body(Empty::new())
                .expect("a GET of a parsed URL");
            let answer = async {
                let response = client.request(request).await.map_err(|e| error_text(&e))?;
                let status = response.status();
                let local = response
                    .extensions()
                    .get::<HttpInfo>()
                    .map(HttpInfo::local_addr);
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| error_text(&e))?;
                match (status.is_success(), local) {
                    (true, Some(local)) => Ok(local),
                    (true, None) => Err("no connection info on the answer".to_owned()),
                    (false, _) => Err(format!("status {}", status.as_u16())),
                }
            };
            let result = tokio::time::timeout(timeout, answer)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
            Outcome {
                took: began.elapsed(),
                result,
            }
        });
        // Tally the finished ones as we go so the set stays small.
        while let Some(done) = in_flight.try_join_next() {
            tally.add(done?);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        tally.add(done?);
    }
    println!("{}", tally.report());
    Ok(())
}
