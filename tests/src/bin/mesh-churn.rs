//! `mesh-churn`: HTTP/1.1 GETs, each on a new TCP connection, as fast as
//! they go.
//!
//! ```text
//! mesh-churn --count 40000 --concurrency 16 10.1.2.11:9080
//! ```
//!
//! Each request asks for `Connection: close`, so the server ends the
//! connection first, and the client closes its side once it read the
//! response to its end. Prints one JSON document: `answered` (a 200 read to
//! its end) and `failed` (anything else), and `errors` (text → count).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// A request that takes longer than this failed.
const TIMEOUT: Duration = Duration::from_secs(10);

async fn one(to: SocketAddr) -> Result<(), String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(to).await?;
        let request = format!("GET /churn HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) if r.starts_with(b"HTTP/1.1 200") => Ok(()),
        Ok(Ok(r)) => Err(format!(
            "not a 200: {:?}",
            String::from_utf8_lossy(&r[..r.len().min(40)])
        )),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let (mut count, mut concurrency, mut to) = (None, 16usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => count = Some(value()?.parse::<u64>().context("--count")?),
            "--concurrency" => concurrency = value()?.parse().context("--concurrency")?,
            _ if !arg.starts_with("--") => to = Some(arg.parse::<SocketAddr>().context("ip:port")?),
            _ => bail!("unknown flag {arg} (see the doc comment of tests/src/bin/mesh-churn.rs)"),
        }
    }
    let (count, to) = (
        count.context("--count is required")?,
        to.context("an ip:port is required")?,
    );
    let (mut started, mut answered) = (0u64, 0u64);
    let mut errors = BTreeMap::<String, u64>::new();
    let mut running = JoinSet::new();
    loop {
        while started < count && running.len() < concurrency.max(1) {
            running.spawn(one(to));
            started += 1;
        }
        match running.join_next().await {
            Some(done) => match done? {
                Ok(()) => answered += 1,
                Err(text) => *errors.entry(text).or_default() += 1,
            },
            None => break,
        }
    }
    let failed: u64 = errors.values().sum();
    println!(
        "{}",
        json!({ "answered": answered, "failed": failed, "errors": errors })
    );
    Ok(())
}
