//! The HTTP/1 server every downstream connection gets, fed arbitrary bytes
//! as one client connection: never panics or hangs, and whatever it writes
//! back is HTTP/1 responses (a 400-class answer for what does not parse).
#![no_main]

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use http::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use nodemesh::proxy::{http1_server, HttpSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime")
    })
}

const SETTINGS: HttpSettings = HttpSettings {
    header_read_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(1),
    max_concurrent_streams: 100,
    max_requests_per_workload: 1024,
};

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let service =
            service_fn(|_request| async { Ok::<_, Infallible>(Response::new(String::from("ok"))) });
        let serving = http1_server(&SETTINGS).serve_connection(TokioIo::new(server), service);
        let talking = async {
            client.write_all(data).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(serving, talking)
        })
        .await
        .expect("the server hung on a finished input");
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1 response: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    });
});
