//! Cluster IPs for Services that do not set one, allocated from the service CIDR.
//!
//! The FNV-1a hash of `namespace/name` selects a host address of the CIDR (network and
//! broadcast addresses excluded); linear probing then skips addresses already taken by
//! explicit cluster IPs or by Services allocated before (Services are allocated in
//! namespace, name order). The hash is fixed rather than std's randomized one, so the same
//! files always yield the same addresses across restarts and reloads, and adding a Service
//! only moves another one whose address it takes.
//!
//! Probing one address at a time would cost O(n) per Service once the range fills up, and
//! O(n²) for a whole load. Instead, runs of taken addresses are skipped the way a
//! disjoint-set forest skips them: every taken slot points towards a later candidate, and
//! lookups compress those paths, so a load stays near linear however full the range is.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

/// The host addresses of a service CIDR, and which of them are taken.
pub(super) struct ClusterIpRange {
    network: u32,
    prefix: u8,
    /// Usable host addresses (network and broadcast excluded).
    hosts: u64,
    /// For every taken slot (host offset), a slot at or after which the next free one is.
    skip: HashMap<u64, u64>,
}

impl ClusterIpRange {
    pub(super) fn new((network, prefix): (Ipv4Addr, u8)) -> Self {
        let host_bits = 32u32.saturating_sub(prefix.into());
        Self {
            network: u32::from(network) & u32::MAX.checked_shl(host_bits).unwrap_or(0),
            prefix,
            hosts: (1u64 << host_bits).saturating_sub(2),
            skip: HashMap::new(),
        }
    }

    /// The range as `a.b.c.d/len`.
    pub(super) fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }

    /// Usable host addresses.
    pub(super) fn size(&self) -> u64 {
        self.hosts
    }

    /// Marks `ip` as taken (an explicit cluster IP); addresses outside the range are ignored.
    pub(super) fn reserve(&mut self, ip: IpAddr) {
        if let Some(slot) = self.slot_of(ip) {
            self.take(slot);
        }
    }

    /// Allocates the address for `key` (`namespace/name`), or `None` if the range is full.
    pub(super) fn allocate(&mut self, key: &str) -> Option<IpAddr> {
        if self.skip.len() as u64 >= self.hosts {
            return None;
        }
        let slot = self.free_slot_from(fnv1a(key.as_bytes()) % self.hosts);
        self.take(slot);
        let offset = u32::try_from(slot).expect("fewer than 2^32 hosts");
        Some(IpAddr::V4(Ipv4Addr::from(self.network + 1 + offset)))
    }

    fn slot_of(&self, ip: IpAddr) -> Option<u64> {
        let IpAddr::V4(ip) = ip else { return None };
        let slot = u64::from(u32::from(ip).wrapping_sub(self.network)).checked_sub(1)?;
        (slot < self.hosts).then_some(slot)
    }

    fn take(&mut self, slot: u64) {
        self.skip.insert(slot, (slot + 1) % self.hosts);
    }

    /// The first free slot at or after `start`, wrapping around; the range is not full.
    fn free_slot_from(&mut self, start: u64) -> u64 {
        let mut path = Vec::new();
        let mut slot = start;
        while let Some(&next) = self.skip.get(&slot) {
            path.push(slot);
            slot = next;
        }
        for taken in path {
            self.skip.insert(taken, slot);
        }
        slot
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr};

    use super::{fnv1a, ClusterIpRange};

    fn range(cidr: &str) -> ClusterIpRange {
        let (network, prefix) = cidr.split_once('/').unwrap();
        ClusterIpRange::new((network.parse().unwrap(), prefix.parse().unwrap()))
    }

    /// Linear probing one address at a time: what the skipping must agree with.
    fn probe(network: u32, hosts: u64, key: &str, taken: &HashSet<IpAddr>) -> Option<IpAddr> {
        let start = fnv1a(key.as_bytes()) % hosts;
        (0..hosts)
            .map(|i| IpAddr::V4(Ipv4Addr::from(network + 1 + ((start + i) % hosts) as u32)))
            .find(|ip| !taken.contains(ip))
    }

    #[test]
    fn agrees_with_probing_one_address_at_a_time() {
        let mut fast = range("10.1.0.0/24");
        let mut taken = HashSet::new();
        for explicit in [
            "10.1.0.7",
            "10.1.0.8",
            "10.1.0.254",
            "10.1.0.1",
            "192.168.0.1",
        ] {
            let ip: IpAddr = explicit.parse().unwrap();
            fast.reserve(ip);
            taken.insert(ip);
        }
        let network = u32::from(Ipv4Addr::new(10, 1, 0, 0));
        // 249 free addresses: fill them all, then one more.
        for i in 0..250 {
            let key = format!("shop/svc-{i}");
            let expected = probe(network, 254, &key, &taken);
            assert_eq!(fast.allocate(&key), expected, "{key}");
            taken.extend(expected);
        }
        assert_eq!(
            taken.len(),
            255,
            "254 hosts plus one address outside the range"
        );
    }

    #[test]
    fn excludes_network_and_broadcast_addresses() {
        let mut r = range("10.0.0.0/30");
        assert_eq!((r.size(), r.cidr().as_str()), (2, "10.0.0.0/30"));
        let mut ips = [r.allocate("a").unwrap(), r.allocate("b").unwrap()];
        ips.sort();
        assert_eq!(
            ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        assert_eq!(r.allocate("c"), None);
        for cidr in ["10.0.0.0/31", "10.0.0.0/32"] {
            assert_eq!(range(cidr).allocate("a"), None, "{cidr}");
        }
    }

    #[test]
    fn filling_a_large_range_is_fast() {
        // Quadratic probing needs ~2·10⁹ steps here; skipping runs needs a few hundred
        // thousand, so this finishes in well under a second even in a debug build.
        let mut r = range("10.96.0.0/16");
        let allocated = (0..70_000)
            .filter_map(|i| r.allocate(&format!("ns/svc-{i}")))
            .collect::<HashSet<_>>();
        assert_eq!(allocated.len() as u64, r.size());
    }
}
