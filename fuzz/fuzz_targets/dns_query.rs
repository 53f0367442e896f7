//! The mesh DNS responder on arbitrary packets: never panics, and every
//! reply it makes answers the query's ID with the QR bit set.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use nodemesh::dns::{answer, Lookup, Reply, Resolver};

/// Answers every name under `cluster.local`, like a small mesh.
struct Mesh;

impl Resolver for Mesh {
    fn lookup(&self, name: &str) -> Lookup {
        match name.strip_suffix(".cluster.local") {
            Some(service) if service.len() % 2 == 0 => Lookup::Addresses(vec![
                IpAddr::from([10, 96, 0, 1]),
                IpAddr::from([0xfd00u16; 8]),
            ]),
            Some(_) => Lookup::NxDomain,
            None => Lookup::Forward,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Reply::Local(reply)) = answer(data, &Mesh) {
        assert_eq!(reply[..2], data[..2], "reply to another query ID");
        assert_ne!(reply[2] & 0x80, 0, "reply without QR");
    }
});
