//! nodemesh's kernel side.
//!
//! All cgroup programs are attached at the cgroup2 root, so they run for every
//! socket on the machine: each one first checks that the caller's network
//! namespace is enrolled (`ENROLLED`, keyed by netns cookie) and does nothing
//! otherwise. Several agents (one per simulated node) can attach side by side
//! because each only acts on its own enrolled namespaces.
//!
//! - `connect4`/`connect6`: TCP connects from enrolled workloads go to the
//!   agent's outbound listener on the workload's loopback; the original
//!   destination is stored by socket cookie. UDP to port 53 goes to the
//!   agent's DNS responder.
//! - `sock_ops`: when a redirected connection is established, re-keys its
//!   original destination by (netns cookie, client port), which is what the
//!   agent sees after `accept()`.
//! - `sendmsg4`/`recvmsg4` (+6): DNS over unconnected UDP sockets, with the
//!   reply's source rewritten back to the resolver the application asked.
//! - `sk_lookup`: attached per enrolled network namespace; steers every TCP
//!   SYN for the workload's addresses to the agent's inbound listener (but
//!   the agent's own deliveries, listed in `DELIVERIES`), and refuses it
//!   when the agent is not there (fail closed).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use nodemesh_common::{
    AddrKey, DeliveryKey, Enrollment, OrigDstKey, SockAddr, AF_INET, AF_INET6, AGENT_MARK,
    DELIVERY_MARK, DNS_PORT, MAX_PENDING_CONNECTIONS, MAX_WORKLOADS, OUTBOUND_PORT,
};

const ALLOW: i32 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const DNS: u16 = 53;
/// 127.0.0.1 in network byte order, as the kernel stores it.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Enrolled workloads of this node, by network-namespace cookie.
#[map]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(MAX_WORKLOADS, 0);

/// Original destination of a redirected socket, by socket cookie, until it is
/// established (TCP) or answered (DNS over UDP).
#[map]
static COOKIE_ORIG: LruHashMap<u64, SockAddr> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// Original destination of an established redirected connection, read (and
/// deleted) by the agent after `accept()`.
#[map]
static ORIG_DST: LruHashMap<OrigDstKey, SockAddr> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// Addresses of enrolled workloads whose inbound connections are captured.
#[map]
static INBOUND_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_WORKLOADS, 0);

/// Connections the agent is opening to an application from its caller's
/// address: their SYNs go to the application, not back to the agent.
#[map]
static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// The agent's inbound listener for each captured address.
#[map]
static INBOUND_SOCKS: SockHash<AddrKey> = SockHash::pinned(MAX_WORKLOADS, 0);

/// The cookie of the network namespace the program runs for.
#[inline(always)]
fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper takes the context the kernel passed to this
    // program, which `ctx` wraps; it only reads.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The cookie of the socket the program runs for.
#[inline(always)]
fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: as in `netns_cookie`, the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A socket's original destination as `remember` recorded it, copied out.
#[inline(always)]
fn recorded_orig(cookie: u64) -> Option<SockAddr> {
    // SAFETY: the value stays allocated while the program runs (map values
    // are freed after an RCU grace period), and it is copied at once. Only
    // the socket's own connect or sendmsg writes it: a UDP socket sending
    // to another resolver while a reply is received could at worst get a
    // mix of its own two destinations.
    unsafe { COOKIE_ORIG.get(cookie) }.copied()
}

#[inline(always)]
fn enrolled<C: EbpfContext>(ctx: &C) -> bool {
    ENROLLED.get_ptr(netns_cookie(ctx)).is_some()
}

/// True for the agent's own sockets, which must never be redirected.
#[inline(always)]
fn is_agent_socket(addr: &bpf_sock_addr) -> bool {
    // SAFETY: the union has this one member, the calling socket.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    // SAFETY: a non-null `sk` of the context is the calling socket, alive
    // for the program's run; the verifier admits reading `mark` from it.
    !sk.is_null() && matches!(unsafe { (*sk).mark }, AGENT_MARK | DELIVERY_MARK)
}

#[inline(always)]
fn user_port(addr: &bpf_sock_addr) -> u16 {
    u16::from_be(addr.user_port as u16)
}

#[inline(always)]
fn set_user_port(addr: &mut bpf_sock_addr, port: u16) {
    addr.user_port = u32::from(port.to_be());
}

/// Where a socket from an enrolled workload should go instead, if anywhere.
#[inline(always)]
fn redirect_port(addr: &bpf_sock_addr, port: u16, connect: bool) -> Option<u16> {
    if addr.type_ == SOCK_STREAM && connect {
        Some(OUTBOUND_PORT)
    } else if addr.type_ == SOCK_DGRAM && port == DNS {
        Some(DNS_PORT)
    } else {
        None
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: SockAddr) {
    let cookie = socket_cookie(ctx);
    // Overwrites: a UDP socket may ask another resolver next time. A second
    // agent's program (upgrade overlap) never gets here, as the destination is
    // loopback by then.
    let _ = COOKIE_ORIG.insert(cookie, orig, 0);
}

#[inline(always)]
fn steer4(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !enrolled(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel passes a `bpf_sock_addr` that lives for the
    // program's run, for this program alone to read and rewrite; the
    // verifier checks each field it touches.
    let addr = unsafe { &mut *ctx.sock_addr };
    if is_agent_socket(addr) {
        return ALLOW;
    }
    let ip = addr.user_ip4;
    // Loopback stays inside the workload (and is where we redirect to).
    if u32::from_be(ip) >> 24 == 127 {
        return ALLOW;
    }
    let port = user_port(addr);
    let Some(to) = redirect_port(addr, port, connect) else {
        return ALLOW;
    };
    remember(
        ctx,
        SockAddr {
            addr: [ip, 0, 0, 0],
            port,
            family: AF_INET,
            _pad: 0,
        },
    );
    addr.user_ip4 = LOOPBACK_V4;
    set_user_port(addr, to);
    debug!(
        ctx,
        "redirect {:i}:{} -> 127.0.0.1:{}",
        u32::from_be(ip),
        port,
        to
    );
    ALLOW
}

#[inline(always)]
fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be()
}

#[inline(always)]
fn steer6(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !enrolled(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel passes a `bpf_sock_addr` that lives for the
    // program's run, for this program alone to read and rewrite; the
    // verifier checks each field it touches.
    let addr = unsafe { &mut *ctx.sock_addr };
    if is_agent_socket(addr) {
        return ALLOW;
    }
    let ip = read_ctx_ip6(&addr.user_ip6);
    let mapped = is_v4_mapped(&ip);
    let loopback = if mapped {
        u32::from_be(ip[3]) >> 24 == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be()
    };
    if loopback {
        return ALLOW;
    }
    let port = user_port(addr);
    let Some(to) = redirect_port(addr, port, connect) else {
        return ALLOW;
    };
    let orig = if mapped {
        SockAddr {
            addr: [ip[3], 0, 0, 0],
            port,
            family: AF_INET,
            _pad: 0,
        }
    } else {
        SockAddr {
            addr: ip,
            port,
            family: AF_INET6,
            _pad: 0,
        }
    };
    remember(ctx, orig);
    addr.user_ip6 = if mapped {
        [0, 0, 0xffffu32.to_be(), LOOPBACK_V4]
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    set_user_port(addr, to);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn nm_connect4(ctx: SockAddrContext) -> i32 {
    steer4(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn nm_connect6(ctx: SockAddrContext) -> i32 {
    steer6(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn nm_sendmsg4(ctx: SockAddrContext) -> i32 {
    steer4(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn nm_sendmsg6(ctx: SockAddrContext) -> i32 {
    steer6(&ctx, false)
}

/// Makes a DNS reply look like it came from the resolver the application
/// asked, so resolvers that check the source accept it.
#[inline(always)]
fn restore_source(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !enrolled(ctx) {
        return ALLOW;
    }
    // SAFETY: as in `steer4`.
    let addr = unsafe { &mut *ctx.sock_addr };
    if user_port(addr) != DNS_PORT {
        return ALLOW;
    }
    let Some(orig) = recorded_orig(socket_cookie(ctx)) else {
        return ALLOW;
    };
    if v6 {
        addr.user_ip6 = if orig.family == AF_INET {
            [0, 0, 0xffffu32.to_be(), orig.addr[0]]
        } else {
            orig.addr
        };
    } else if orig.family == AF_INET {
        addr.user_ip4 = orig.addr[0];
    } else {
        return ALLOW;
    }
    set_user_port(addr, orig.port);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn nm_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn nm_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_source(&ctx, true)
}

#[sock_ops]
pub fn nm_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || !enrolled(&ctx) {
        return 0;
    }
    let cookie = socket_cookie(&ctx);
    let Some(orig) = recorded_orig(cookie) else {
        return 0;
    };
    // Keyed by the family the agent's listener sees the client in: a
    // dual-stack socket that dialled a v4-mapped address (gRPC's clients do)
    // arrives on the IPv4 listener, and its `orig` was recorded as IPv4.
    let key = OrigDstKey {
        netns_cookie: netns_cookie(&ctx),
        port: ctx.local_port() as u16,
        family: orig.family,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(key, orig, 0);
    let _ = COOKIE_ORIG.remove(cookie);
    0
}

#[sk_lookup]
pub fn nm_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel's `bpf_sk_lookup` for this lookup, alive for the
    // program's run and only read here.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let v4 = lookup.family == u32::from(AF_INET);
    let (remote, local) = if v4 {
        ([lookup.remote_ip4, 0, 0, 0], [lookup.local_ip4, 0, 0, 0])
    } else {
        (
            read_ctx_ip6(&lookup.remote_ip6),
            read_ctx_ip6(&lookup.local_ip6),
        )
    };
    // The agent's own delivery, from the caller's address, announced by the
    // agent just before it connects: it goes to the application. (The
    // ingress interface cannot tell: a SYN the agent sends to the
    // workload's address over `lo` is reported as arriving on the device
    // that holds the address.)
    let delivery = DeliveryKey {
        remote,
        local,
        remote_port: u16::from_be(lookup.remote_port),
        local_port: lookup.local_port as u16,
        family: lookup.family,
    };
    if DELIVERIES.get_ptr(delivery).is_some() {
        return SK_PASS;
    }
    let key = AddrKey {
        addr: local,
        family: lookup.family,
    };
    if INBOUND_ADDRS.get_ptr(key).is_none() {
        return SK_PASS;
    }
    match INBOUND_SOCKS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        // Captured address but no agent listening: refuse rather than let
        // the connection reach the application unmeshed.
        Err(_) => SK_DROP,
    }
}

/// Copies an IPv6 address out of a context one word at a time: the verifier
/// rejects the pointer arithmetic a whole-array copy compiles to.
#[inline(always)]
fn read_ctx_ip6(ip: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each word is a field of the program's context, valid for
    // reads; volatile keeps each a single 4-byte load.
    unsafe {
        [
            core::ptr::read_volatile(&ip[0]),
            core::ptr::read_volatile(&ip[1]),
            core::ptr::read_volatile(&ip[2]),
            core::ptr::read_volatile(&ip[3]),
        ]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the one symbol of this name, in the section the loader reads the
// programs' license from (GPL-only helpers need it).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
