//! The node-local admin API: JSON over a root-only unix socket, one request
//! line and one response per connection. The CLI is its only client.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Where agents put their sockets by default: `<dir>/<node>.sock`.
pub const SOCKET_DIR: &str = "/run/nodemesh";

/// What the CLI can ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Query {
    Status,
    Workloads,
    Services,
    Connections,
    Certs,
    Routes,
    /// The Gateways this node serves (`nodemesh gateways`).
    Gateways,
    Explain(crate::proxy::ExplainRequest),
    /// The AuthorizationPolicies of one workload (`namespace/name`), or of
    /// every workload of the node.
    Policies(Option<String>),
    /// Each edge's counts over the last this many seconds (`nodemesh stat`,
    /// `top`, `graph`).
    Stats(u64),
}

#[derive(Serialize, Deserialize)]
struct Request {
    get: Query,
}

/// Answers admin queries; implemented by the running agent.
pub trait Responder: Send + Sync + 'static {
    fn answer(&self, query: Query) -> serde_json::Value;
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no nodemesh agent is running here: {0} does not exist. Start one with \
         `nodemesh agent --config-dir DIR --node-name NODE`, or point at its socket with --socket"
    )]
    NoAgent(PathBuf),
    #[error(
        "the agent behind {0} is not answering (it may have stopped); is `nodemesh agent` running?"
    )]
    NotAnswering(PathBuf),
    #[error("permission denied on {0}: the admin socket is root-only, run this as root")]
    Permission(PathBuf),
    #[error("several agents run here ({0}); pick one with --node NODE or --socket PATH")]
    Ambiguous(String),
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the agent sent an answer this CLI does not understand: {0}")]
    Protocol(String),
}

/// Binds the admin socket, readable and writable by root only.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
    }
    // A socket left by a crashed agent; refuse to steal a live one.
    if UnixStream::connect(path).is_ok() {
        return Err(io(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another agent is serving this socket",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, responder: Arc<dyn Responder>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read);
            let read =
                tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            let answer = match read {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => responder.answer(req.get),
                    Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
                },
                _ => return,
            };
            let mut bytes = answer.to_string().into_bytes();
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
}

/// The socket to talk to: the one given, the node's, or the only one here.
pub fn locate(socket: Option<PathBuf>, node: Option<&str>) -> Result<PathBuf, AdminError> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    let dir = Path::new(SOCKET_DIR);
    if let Some(node) = node {
        return Ok(dir.join(format!("{node}.sock")));
    }
    let mut sockets = sockets_here();
    match sockets.len() {
        0 => Err(AdminError::NoAgent(dir.join("<node>.sock"))),
        1 => Ok(sockets.remove(0)),
        _ => Err(AdminError::Ambiguous(
            sockets
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Every agent socket in [`SOCKET_DIR`].
pub fn sockets_here() -> Vec<PathBuf> {
    let mut sockets: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    sockets.sort();
    sockets
}

/// Sends one query and returns the agent's answer.
pub fn query(socket: &Path, get: Query) -> Result<serde_json::Value, AdminError> {
    let path = socket.to_owned();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => AdminError::NoAgent(path.clone()),
        io::ErrorKind::ConnectionRefused => AdminError::NotAnswering(path.clone()),
        io::ErrorKind::PermissionDenied => AdminError::Permission(path.clone()),
        _ => AdminError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let io = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut request = serde_json::to_vec(&Request { get }).expect("serializable request");
    request.push(b'\n');
    stream.write_all(&request).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line).map_err(|e| AdminError::Protocol(e.to_string()))
}
