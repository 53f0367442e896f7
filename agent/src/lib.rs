//! The nodemesh agent as a library: the `nodemesh` binary (daemon and CLI)
//! is a thin front over it, and the fuzz targets (`fuzz/`) drive the same
//! parsers the data path runs.
// A connection's future is allocated whole for each connection and moved
// when spawned: one over 16 KiB must be boxed where it is awaited, so that
// a connection pays only for the path it takes (every outbound connection
// took 52 KiB before this was enforced).
#![warn(clippy::large_futures)]

pub mod admin;
pub mod agent;
pub mod ca;
pub mod cli;
pub mod config;
pub mod dns;
pub mod ebpf;
pub mod identity;
pub mod ingress;
pub mod lifecycle;
pub mod memory;
pub mod netns;
pub mod nofile;
pub mod proxy;
pub mod reply_routing;
pub mod routing;
pub mod security;
pub mod sources;
pub mod telemetry;
pub mod transport;
pub mod viz;
pub mod workers;
pub mod workloads;

/// The unit tests' allocator counts the bytes each thread holds, for the memory tests of
/// the Kubernetes source (shared with the memory tests of `tests/`).
#[cfg(test)]
#[path = "../tests/counting/mod.rs"]
mod counting;
