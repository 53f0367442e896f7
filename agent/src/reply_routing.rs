//! Policy routing inside an enrolled workload, so that the application's
//! replies to a transparent delivery come back to the agent.
//!
//! The agent delivers an inbound connection to the application from the
//! caller's own address (`IP_TRANSPARENT`, see `proxy::peer::deliver`), so
//! the application sees who really called. Its replies are addressed to that
//! caller, and the main table would send them out of `eth0` to the real
//! caller, which knows nothing of the connection. Inside the workload's
//! namespace the agent therefore sets `net.ipv4.tcp_fwmark_accept=1` (IPv4
//! and IPv6: an accepted connection takes the mark of its SYN, here the
//! delivery socket's `DELIVERY_MARK`) and `fwmark_reflect=1` (v4 and v6: the
//! kernel's reset to a delivery for a closed port carries it too, so the
//! agent sees the refusal) and installs, for IPv4 and IPv6:
//!
//! ```text
//! ip rule add pref 100 fwmark 0x4e4d0002 lookup 15006
//! ip route replace local default dev lo table 15006
//! ```
//!
//! The application's side of every delivery is routed as local: it loops
//! over `lo` and reaches the agent's delivery socket bound to the caller's
//! address. Everything else keeps the main table: the agent's own sockets
//! (`AGENT_MARK`: they still dial destinations outside the workload), the
//! kernel's resets (so a refused SYN is refused at once), connections the
//! application held before it was enrolled, and anything received.
//!
//! The brief's first idea, all unmarked TCP generated in the workload to
//! `lo` ("in an enrolled workload the application's TCP only ever talks to
//! agent sockets on lo": its connects are redirected to the agent on
//! loopback, DNS over TCP included, a connect to its own pod address too,
//! and every connection it accepts was delivered by the agent), holds for
//! the application's sockets but not for the kernel's: the reset for a SYN
//! refused while the agent is down, or for a stray segment, would loop to
//! `lo` too (the caller would hang instead of being refused), and so would
//! the packets of connections opened before enrollment. Marking exactly the
//! delivered connections avoids both.
//!
//! The rules are installed by running iproute2's `ip` inside the namespace
//! (the child inherits the network namespace of the thread that spawns it),
//! as Istio's CNI runs `iptables`: four small, idempotent commands per
//! enrollment, which a hand-written netlink client would replace with a few
//! hundred lines of message encoding and error decoding to maintain.

use std::io;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use nodemesh_common::DELIVERY_MARK;

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
    #[error(
        "setting net.ipv4.tcp_fwmark_accept and fwmark_reflect in the workload's \
         network namespace: {0}"
    )]
    Sysctl(io::Error),
    #[error(
        "setting net.ipv4.tcp_fwmark_accept in the workload's network namespace: {0}: \
         in a container /proc/sys is read-only; mount the node's /proc/sys/net at \
         {HOST_PROC_SYS_NET} (a hostPath volume, as deploy/kubernetes/04-agent.yaml does)"
    )]
    ReadOnlySysctl(io::Error),
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

/// Routes the application's side of deliveries back to the agent (see the
/// module documentation). Idempotent: a restarted agent finds it in place. IPv6 is
/// optional in a workload: without it only IPv4 is routed.
pub fn install(netns: &NetNs) -> Result<(), ReplyRoutingError> {
    set_fwmark_accept(netns, true)?;
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
    v4?;
    set_fwmark_accept(netns, false)
}

/// Where a container finds the node's `/proc/sys/net` writable: container
/// runtimes mount `/proc/sys` read-only, so the DaemonSet mounts the node's
/// at this path (as Cilium's does). What a sysctl file under it shows and
/// sets is the network namespace of the thread that opens it.
pub const HOST_PROC_SYS_NET: &str = "/host/proc/sys/net";

/// In the workload: `tcp_fwmark_accept` (IPv4 and IPv6), so a connection
/// the application accepts takes the mark of its SYN and its side of a
/// delivery carries `DELIVERY_MARK`; `fwmark_reflect`, so the kernel's reset
/// to a delivery nobody listens for carries it too (and reaches the agent).
fn set_fwmark_accept(netns: &NetNs, on: bool) -> Result<(), ReplyRoutingError> {
    const SYSCTLS: [&str; 3] = [
        "ipv4/tcp_fwmark_accept",
        "ipv4/fwmark_reflect",
        "ipv6/fwmark_reflect",
    ];
    let host = Path::new(HOST_PROC_SYS_NET);
    let dir = if host.is_dir() {
        host
    } else {
        Path::new("/proc/sys/net")
    };
    let value = if on { "1" } else { "0" };
    netns
        .enter(|| {
            SYSCTLS[..2]
                .iter()
                .try_for_each(|sysctl| std::fs::write(dir.join(sysctl), value))?;
            // IPv6 is optional in a workload.
            let _ = std::fs::write(dir.join(SYSCTLS[2]), value);
            Ok(())
        })
        .map_err(|e| match e.kind() {
            io::ErrorKind::ReadOnlyFilesystem => ReplyRoutingError::ReadOnlySysctl(e),
            _ => ReplyRoutingError::Sysctl(e),
        })
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
        "fwmark",
        &format!("{DELIVERY_MARK:#x}"),
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
