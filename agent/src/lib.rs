//! The nodemesh agent as a library: the `nodemesh` binary (daemon and CLI)
//! is a thin front over it, and the fuzz targets (`fuzz/`) drive the same
//! parsers the data path runs.

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
