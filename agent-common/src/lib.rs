//! Types and constants shared by the eBPF programs (kernel side) and the agent
//! (user side). Everything here is `#[repr(C)]` and plain data so both sides
//! agree on the byte layout of map keys and values.
#![no_std]

/// `SO_MARK` carried by every socket the agent opens inside a workload's
/// network namespace; the programs never redirect a socket with this mark.
pub const AGENT_MARK: u32 = 0x4e4d_0001;
/// `SO_MARK` of the agent's delivery sockets (caller's address, into the
/// application). With `tcp_fwmark_accept` the application's side of the
/// connection inherits it, and the workload's routing sends everything
/// carrying it back over `lo` to the agent. Never redirected either.
pub const DELIVERY_MARK: u32 = 0x4e4d_0002;

/// Port of the agent's outbound listener on the workload's loopback.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's inbound listener (SYNs are steered to it by `sk_lookup`).
pub const INBOUND_PORT: u16 = 15006;
/// Port of the agent's DNS responder on the workload's loopback.
pub const DNS_PORT: u16 = 15053;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Capacity of the per-node maps: 250 workloads per node is the design
/// target, with room for addresses and churn.
pub const MAX_WORKLOADS: u32 = 4096;
/// In-flight connections whose original destination is not yet read back.
pub const MAX_PENDING_CONNECTIONS: u32 = 65536;

/// Value of the `ENROLLED` map, keyed by the workload's network-namespace
/// cookie: an unforgeable identity of the calling workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// The agent's id for the workload (reported back in logs).
    pub workload_id: u32,
    pub flags: u32,
}

/// An IPv4 or IPv6 socket address. Addresses are in network byte order (as
/// the kernel hands them out), the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockAddr {
    /// IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of the `ORIG_DST` map: identifies a redirected connection as the agent
/// sees it after `accept()` (the client's port inside its network namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// The client's local port, host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Key of the `DELIVERIES` map: a connection the agent is opening to an
/// application from the caller's address, as `sk_lookup` sees its SYN.
/// Addresses in network byte order (IPv4 in `[0]`), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeliveryKey {
    pub remote: [u32; 4],
    pub local: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
    pub family: u32,
}

/// Key of the inbound maps: a local address of an enrolled workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)] plain data with explicit padding fields.
    unsafe impl aya::Pod for super::Enrollment {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::DeliveryKey {}
}
