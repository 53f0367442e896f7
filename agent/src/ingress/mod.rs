//! The node agent as the mesh's ingress gateway (Istio `Gateway`).

pub mod tls;
