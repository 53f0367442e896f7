//! The ingress phases (issue 14): a client outside the mesh, on the
//! inter-node fabric like a load balancer, reaches the server through
//! node-a's agent serving an Istio `Gateway` on port 80, which routes the
//! request with a VirtualService bound to the Gateway and forwards it over
//! mutual TLS, as the ingress's own identity, to node-b's agent and nginx:
//! the whole north-south path. Measured against the same outside client
//! calling the server pod directly in the direct mode.

use anyhow::{bail, Result};
use nodemesh_testbed::Topology;

use super::mtls::ECHO_HEADER;
use super::probe::Probe;

/// The config file of the Gateway and its VirtualService, present only
/// while the ingress phases run.
pub(super) const FILE: &str = "ingress.yaml";
/// The outside client's address on the fabric: `10.0.0.<index>`.
pub(super) const OUTSIDE_INDEX: u8 = 210;
/// The Gateway's port on the node's own address.
pub(super) const PORT: u16 = 80;
/// Set on responses by the Gateway's route: a response carrying it was
/// routed by the ingress.
const ROUTE_HEADER: &str = "x-bench-ingress";
/// The ingress's identity, as the destination agent reports it in
/// `X-Forwarded-Client-Cert`.
const IDENTITY: &str = "/sa/nodemesh-ingress";

/// A Gateway on port 80 of every node for any host, and a VirtualService
/// bound to it that forwards everything to `service`.
pub(super) fn gateway(namespace: &str, service: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: bench-ingress\n  \
         namespace: {namespace}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  \
         - port: {{number: {PORT}, name: http, protocol: HTTP}}\n    hosts: ['*']\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
         name: bench-ingress\n  namespace: {namespace}\nspec:\n  hosts: ['*']\n  \
         gateways: [bench-ingress]\n  http:\n  - route: [{{destination: {{host: {service}}}}}]\n    \
         headers: {{response: {{set: {{{ROUTE_HEADER}: ingress}}}}}}\n"
    )
}

/// One request from `netns` to `url`: nginx's body, routed by the
/// Gateway's VirtualService, and reaching nginx over mutual TLS as the
/// ingress's identity.
pub(super) fn check_response(
    topo: &Topology,
    netns: &str,
    url: &str,
    body_size: usize,
) -> Result<()> {
    let probe = Probe::get(topo, netns, url)?;
    let want = format!("200 {body_size}");
    let identity = probe.header(ECHO_HEADER);
    if probe.summary != want
        || probe.header(ROUTE_HEADER).is_none()
        || !identity.as_deref().is_some_and(|v| v.contains(IDENTITY))
    {
        bail!(
            "{url} did not go through the ingress into the mesh (want status and body size \
             {want:?}, `{ROUTE_HEADER}`, and the ingress's identity `{IDENTITY}` in the \
             X-Forwarded-Client-Cert nginx saw); got {:?}, headers:\n{}",
            probe.summary,
            probe.headers
        );
    }
    Ok(())
}
