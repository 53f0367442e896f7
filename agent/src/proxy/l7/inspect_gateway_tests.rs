//! `explain --gateway` against a loaded config: a Gateway with an HTTP
//! server that redirects, two HTTPS servers picked by SNI, a PASSTHROUGH
//! server, in front of `explain`'s own mesh with an AuthorizationPolicy.

use serde_json::{json, Value};

use super::*;
use crate::config::Config;
use crate::proxy::l7::inspect::tests::MESH;

/// Node `n1`, the ingress, and in front of `MESH`'s `web` a Gateway
/// whose routes send `jason` to v2 (DISABLE: plaintext) and others to v1
/// (STRICT), where only the ingress's identity is allowed.
const GATEWAY: &str = "
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.1.0.1}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/istio-system/sa/nodemesh-ingress]}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [shop.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https-shop, protocol: HTTPS}
    hosts: [shop.example.com]
    tls: {mode: SIMPLE, credentialName: shop-cred}
  - port: {number: 443, name: https-api, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: api-cred}
  - port: {number: 8443, name: tls-db, protocol: TLS}
    hosts: [db.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: [shop.example.com, api.example.com]
  gateways: [public]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2, port: {number: 80}}}]
  - name: others
    route: [{destination: {host: web, subset: v1, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  gateways: [public]
  tls:
  - match: [{sniHosts: [db.example.com]}]
    route: [{destination: {host: web, port: {number: 80}}}]
";

/// A `kubernetes.io/tls` Secret in `shop` for `host`, self-signed.
fn secret(name: &str, host: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "shop"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.pem(), "tls.key": key.serialize_pem()},
    })
    .to_string()
}

fn config() -> Config {
    let shop = secret("shop-cred", "shop.example.com");
    let api = secret("api-cred", "api.example.com");
    let config = inspect::tests::config(&[
        ("mesh.yaml", MESH),
        ("gateway.yaml", GATEWAY),
        ("shop-cred.yaml", &shop),
        ("api-cred.yaml", &api),
    ]);
    let warnings = &config.routing().warnings;
    assert!(warnings.is_empty(), "{warnings:?}");
    config
}

fn at(config: &Config, at: &str, url: &str, sni: Option<&str>, headers: &[(&str, &str)]) -> Value {
    let ask = ExplainRequest {
        from: None,
        gateway: Some(at.into()),
        sni: sni.map(Into::into),
        ..inspect::tests::ask(url, headers)
    };
    let facts = Facts {
        config,
        trust_domain: "cluster.local",
        ejected: &[],
    };
    explain(&facts, "n1", at, &ask).unwrap()
}

#[test]
fn sni_picks_the_server_and_certificate_then_the_bound_route_decides() {
    let config = config();
    let out = at(
        &config,
        "443",
        "https://shop.example.com/",
        None,
        &[("end-user", "jason")],
    );
    assert_eq!(out["gateway"], "shop/public", "{out:#}");
    assert_eq!(out["server"], "spec.servers[1]");
    assert_eq!(out["tls"]["sni"], "shop.example.com");
    assert_eq!(out["tls"]["mode"], "SIMPLE");
    assert_eq!(out["tls"]["certificate"], "Secret shop/shop-cred");
    assert!(out["tls"]["certificateExpiry"].is_string(), "{out:#}");
    assert!(out["origin"]
        .as_str()
        .unwrap()
        .starts_with("VirtualService shop/shop"));
    assert_eq!(out["route"], "jason");
    assert_eq!(out["matchedBy"], "header end-user=jason", "{out:#}");
    assert_eq!(
        out["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/nodemesh-ingress"
    );
    // v2 takes plaintext (DISABLE): the ingress is known by its address
    // only there, and the policy that allows its identity does not match.
    let v2 = &out["destinations"][0];
    assert_eq!(v2["service"], "shop/web");
    assert_eq!(v2["subset"], "v2");
    assert_eq!(v2["endpoints"], json!(["shop/web-v2 10.0.0.2:8080"]));
    assert_eq!(
        v2["mtls"],
        json!(["DISABLE (PeerAuthentication shop/web-v2) at shop/web-v2"])
    );
    assert_eq!(
        v2["authorization"],
        json!(["denied: no rule of ALLOW policy shop/ingress-only matches at shop/web-v2"]),
        "{out:#}"
    );

    let other = at(&config, "443", "https://shop.example.com/", None, &[]);
    assert_eq!(other["route"], "others");
    let v1 = &other["destinations"][0];
    assert_eq!(v1["subset"], "v1");
    assert_eq!(
        v1["mtls"],
        json!(["STRICT (PeerAuthentication shop/default) at shop/web-v1"])
    );
    assert_eq!(
        v1["authorization"],
        json!(["allowed by ALLOW policy shop/ingress-only, rule 0 at shop/web-v1"]),
        "the ingress identity over mutual TLS: {other:#}"
    );

    // The other server's SNI: its certificate, and only its hosts.
    let api = at(
        &config,
        "10.1.0.1:443",
        "https://api.example.com/",
        None,
        &[],
    );
    assert_eq!(api["server"], "spec.servers[2]", "{api:#}");
    assert_eq!(api["tls"]["certificate"], "Secret shop/api-cred");
    let crossed = at(
        &config,
        "443",
        "https://shop.example.com/",
        Some("api.example.com"),
        &[],
    );
    assert_eq!(
        crossed["tls"]["certificate"], "Secret shop/api-cred",
        "{crossed:#}"
    );
    assert_eq!(
        crossed["summary"],
        "the ingress answers 404: no Gateway server on port 443 admits host \"shop.example.com\""
    );
}

#[test]
fn redirects_unknown_ports_hosts_and_names_are_said_plainly() {
    let config = config();
    let plain = at(
        &config,
        "80",
        "http://shop.example.com/cart?id=1",
        None,
        &[],
    );
    assert_eq!(
        plain["summary"],
        "the ingress answers 301 to https://shop.example.com/cart?id=1 (httpsRedirect)",
        "{plain:#}"
    );
    assert_eq!(plain["server"], "spec.servers[0]");

    let port = at(&config, "81", "http://shop.example.com/", None, &[]);
    assert_eq!(
        port["summary"],
        "no Gateway server of this node is on port 81: the connection is refused (ports \
         served: 80, 443, 8443)"
    );
    let host = at(&config, "80", "http://other.example.com/", None, &[]);
    assert_eq!(
        host["summary"],
        "the ingress answers 404: no Gateway server on port 80 admits host \"other.example.com\""
    );
    let sni = at(&config, "443", "https://other.example.com/", None, &[]);
    assert_eq!(
        sni["summary"],
        "no TLS server on port 443 takes SNI other.example.com: the handshake is refused"
    );
    let tls_on_plain = at(&config, "80", "https://shop.example.com/", None, &[]);
    assert_eq!(
        tls_on_plain["summary"],
        "no server on port 80 speaks TLS: the handshake fails"
    );
    let address = at(
        &config,
        "10.9.9.9:80",
        "http://shop.example.com/",
        None,
        &[],
    );
    assert_eq!(
        address["summary"],
        "this node's ingress does not listen on 10.9.9.9 (it listens on 10.1.0.1)"
    );
}

#[test]
fn passthrough_is_relayed_by_the_tls_rule_of_its_sni() {
    let config = config();
    let out = at(&config, "8443", "https://db.example.com/", None, &[]);
    assert_eq!(out["tls"]["mode"], "PASSTHROUGH", "{out:#}");
    assert!(out["tls"]["certificate"].is_null());
    assert_eq!(out["route"], "spec.tls[0]");
    assert!(out["summary"]
        .as_str()
        .unwrap()
        .starts_with("relayed as bytes by VirtualService shop/db"));
    let web = &out["destinations"][0];
    assert_eq!(web["port"], 80);
    assert_eq!(
        web["endpoints"],
        json!(["shop/web-v1 10.0.0.1:8080", "shop/web-v2 10.0.0.2:8080"])
    );
}

#[test]
fn addresses_and_ports_are_read_as_the_flag_says() {
    assert_eq!(parse_at("443").unwrap(), (None, 443));
    assert_eq!(
        parse_at("[::1]:8443").unwrap(),
        (Some("::1".parse().unwrap()), 8443)
    );
    let bad = parse_at("gw:80").unwrap_err();
    assert!(bad.contains("expected [ADDRESS:]PORT"), "{bad}");
}
