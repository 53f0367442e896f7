//! Test bed for nodemesh: builds a whole cluster out of network namespaces
//! on one machine and drives real agents and real workloads inside it.
//!
//! * [`topology`] — nodes, pods and the links between them; spawns processes
//!   inside them and cleans everything up on drop, even when a test panics.
//! * [`exit_cleanup`] — cleanups that run once the test process has exited,
//!   also when a signal killed it and no `Drop` ran.
//! * [`config`] — writes the agent's YAML configuration (Namespace, Workload,
//!   Service) into a config directory.
//! * [`agent`] — starts, crashes, restarts and queries a `nodemesh` agent.
//! * [`ca`] — a real `nodemesh ca` on a host of its own, and node credentials.
//! * [`container`] — the container image run by a real container runtime
//!   (podman, runc) as the Kubernetes manifests run it.
//! * [`workload_apps`] — small real servers and clients run inside pods
//!   (HTTP echo, TCP echo, curl).
//! * [`helm`] — the Helm chart rendered by a Helm-compatible renderer.
//! * [`kube`] — a real Kubernetes API server reachable from the topology,
//!   and pods run as a kubelet would, for the agent's Kubernetes mode.
//! * [`kube_endpoints`] — EndpointSlices written as the endpoint controller
//!   would (the test's API server runs no controllers).
//! * [`kube_mesh`] — Bookinfo on agents in Kubernetes mode, through the API.
//! * [`kube_scale`] — a cluster of thousands of Services, pods and routes.
//! * [`mesh`] — an L7 mesh of `mesh-app` pods on two nodes, and Istio's
//!   Bookinfo on it.
//! * [`prometheus`] — a real Prometheus scraping the agents, and PromQL.
//! * [`otlp`] — a real OTLP/HTTP trace receiver (the official protobuf
//!   classes), writing the spans it gets for the test to check.
//! * [`tenants`] — an attacker and a victim sharing one node's proxy, for
//!   the hardening tests.
//!
//! Nothing built here lives in the machine's own network namespace, so
//! traffic that escapes redirection stays inside the test topology.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
pub mod config;
pub mod container;
pub mod exit_cleanup;
pub mod helm;
pub mod kube;
pub mod kube_endpoints;
pub mod kube_mesh;
pub mod kube_scale;
pub mod mesh;
pub mod otlp;
pub mod prometheus;
pub mod tenants;
pub mod topology;
pub mod workload_apps;

pub use agent::{nodemesh_bin, Agent};
pub use topology::{netns_with_prefix, NodeInfo, PodInfo, Topology};
