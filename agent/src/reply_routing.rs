//! Policy routing inside an enrolled workload, so that the application's
//! replies to a transparent delivery come back to the agent.
//!
//! The agent delivers an inbound connection to the application from the
//! caller's own address (`IP_TRANSPARENT`, see `proxy::peer::deliver`), so
//! the application sees who really called. Its replies are addressed to that
//! caller, and the main table would send them out of `eth0` to the real
//! caller, which knows nothing of the connection. Inside the workload's
//! namespace the agent therefore installs, for IPv4 and IPv6:
//!
//! ```text
//! ip rule add pref 100 iif lo ipproto tcp fwmark 0/0xffffffff lookup 15006
//! ip route replace local default dev lo table 15006
//! ```
//!
//! TCP generated in the namespace without any mark is routed as local: it
//! loops over `lo` and reaches the agent's delivery socket bound to the
//! caller's address. Everything else keeps the main table: the agent's own
//! sockets (they carry `AGENT_MARK` and still dial destinations outside the
//! workload), UDP (DNS) and anything received from outside.
//!
//! Why sending *all* of the application's unmarked TCP to `lo` is right: in
//! an enrolled workload its TCP only ever talks to agent sockets on `lo`.
//! - Every `connect()` it makes is redirected by `connect4`/`connect6` to the
//!   agent's outbound listener on `127.0.0.1`/`::1` (DNS over TCP to the
//!   resolver included), except to loopback, and loopback addresses (like
//!   its own pod address) are resolved by the `local` table (rule 0), before
//!   this rule is consulted.
//! - Every SYN to its addresses from outside is steered to the agent's
//!   inbound listener by `sk_lookup`, so every connection it accepts was
//!   delivered by the agent over `lo`. (So even a SYN that slipped past
//!   `sk_lookup` would get no answer outside the workload.)
//! - A call to its own pod address goes to the agent (connect4), whose
//!   marked socket reaches the application over `lo` (local table).
//!
//! `iif lo` limits the rule to locally generated packets: without it, a
//! packet another host routes *through* the workload to any address would
//! be accepted as local and reach a socket bound to `0.0.0.0` unmeshed.
//!
//! Known cost: connections the application had open before it was enrolled
//! (and delivered connections still open when it leaves the mesh) lose their
//! replies when the rule appears (or goes).
//!
//! The rules are installed by running iproute2's `ip` inside the namespace
//! (the child inherits the network namespace of the thread that spawns it),
//! as Istio's CNI runs `iptables`: four small, idempotent commands per
//! enrollment, which a hand-written netlink client would replace with a few
//! hundred lines of message encoding and error decoding to maintain.

use std::io;
use std::process::{Command, Output, Stdio};

use crate::netns::NetNs;

/// Routing table holding `local default dev lo`. Any id but 0 and 253–255
/// (the kernel's `unspec`, `default`, `main`, `local`) works; this one,
/// the inbound listener's port, is unused by the CNIs we know inside a pod
/// (Istio's in-pod mode uses 100, its sidecar TPROXY 133) and easy to
/// recognise in `ip rule`.
pub const REPLY_TABLE: u32 = 15006;
/// Priority of the rule: after the `local` table (0), so the workload's own
/// and loopback addresses stay local, and before anything a CNI may add for
/// the pod's traffic (source routing, usually at 512 and above), which must
/// not send the application's replies past the agent.
pub const REPLY_RULE_PRIORITY: u32 = 100;

/// Installing or removing the routing failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplyRoutingError {
    #[error(
        "cannot run `ip` (iproute2) in the workload's network namespace: {0}; \
         install iproute2 on the node"
    )]
    Spawn(io::Error),
    #[error(
        "`ip {command}` in the workload's network namespace failed: {stderr} \
         (the agent needs CAP_NET_ADMIN)"
    )]
    Failed { command: String, stderr: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// Routes the application's unmarked TCP back to the agent (see the module
/// documentation). Idempotent: a restarted agent finds it in place. IPv6 is
/// optional in a workload: without it only IPv4 is routed.
pub fn install(netns: &NetNs) -> Result<(), ReplyRoutingError> {
    install_family(netns, Family::V4)?;
    if let Err(e) = install_family(netns, Family::V6) {
        log::debug!("no IPv6 reply routing in the workload: {e}");
    }
    Ok(())
}

/// Removes what [`install`] added; what is already gone is fine.
pub fn remove(netns: &NetNs) -> Result<(), ReplyRoutingError> {
    let v4 = remove_family(netns, Family::V4);
    let _ = remove_family(netns, Family::V6);
    v4
}

fn install_family(netns: &NetNs, family: Family) -> Result<(), ReplyRoutingError> {
    ip(netns, family, &route("replace"), &[])?;
    ip(netns, family, &rule("add"), &["File exists"])
}

fn remove_family(netns: &NetNs, family: Family) -> Result<(), ReplyRoutingError> {
    ip(netns, family, &rule("del"), &["No such file or directory"])?;
    ip(netns, family, &route("del"), &["No such process"])
}

fn rule(verb: &str) -> Vec<String> {
    [
        "rule",
        verb,
        "pref",
        &REPLY_RULE_PRIORITY.to_string(),
        "iif",
        "lo",
        "ipproto",
        "tcp",
        "fwmark",
        "0/0xffffffff",
        "lookup",
        &REPLY_TABLE.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn route(verb: &str) -> Vec<String> {
    [
        "route",
        verb,
        "local",
        "default",
        "dev",
        "lo",
        "table",
        &REPLY_TABLE.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `ip FAMILY ARGS` inside `netns`; a failure whose message contains
/// one of `already` (the state is already the one asked for) is success.
fn ip(
    netns: &NetNs,
    family: Family,
    args: &[String],
    already: &[&str],
) -> Result<(), ReplyRoutingError> {
    let child = netns
        .enter(|| {
            Command::new("ip")
                .arg(family.flag())
                .args(args)
                // The messages are matched below: untranslated.
                .env("LC_ALL", "C")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .map_err(ReplyRoutingError::Spawn)?;
    let Output { status, stderr, .. } =
        child.wait_with_output().map_err(ReplyRoutingError::Spawn)?;
    let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
    if status.success() || already.iter().any(|a| stderr.contains(a)) {
        return Ok(());
    }
    Err(ReplyRoutingError::Failed {
        command: format!("{} {}", family.flag(), args.join(" ")),
        stderr,
    })
}
