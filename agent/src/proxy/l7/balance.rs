//! Choosing an endpoint: load-balancing algorithms over per-endpoint state
//! that outlives config reloads, and outlier detection that ejects failing
//! endpoints for a while.
//!
//! State is node-wide per destination (Service, subset, port): every
//! workload on the node feeds the same latency and failure observations, so
//! a bad endpoint is found sooner than by one sidecar alone.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::routing::locality::Groups;
use crate::routing::{HashKey, LoadBalancer, OutlierDetection};

/// Latency assumed for an endpoint with no observations yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// How fast the moving average forgets (Finagle's and Linkerd's choice).
const DECAY: Duration = Duration::from_secs(10);

/// One destination: a Service port, optionally narrowed to a subset. The
/// names are the route table's own (shared, not copied per request).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub service: Arc<str>,
    pub subset: Option<Arc<str>>,
    pub port: u16,
}

/// Per-endpoint observations of one cluster.
#[derive(Default)]
pub struct Cluster {
    endpoints: RwLock<HashMap<SocketAddr, Arc<Endpoint>>>,
    next: AtomicUsize,
    /// The endpoints grouped by locality, for one config snapshot and
    /// address family: computed once per snapshot, not per request.
    groups: RwLock<Option<(GroupsKey, Option<Arc<Groups>>)>>,
}

/// Config generation, IPv4.
type GroupsKey = (u64, bool);

#[derive(Default)]
pub struct Endpoint {
    /// Requests sent and not yet answered.
    pending: AtomicU32,
    /// Peak-EWMA of response latency, in nanoseconds (0: none yet).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds since `epoch()`.
    stamp_ns: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejected until this time (nanoseconds since `epoch()`; 0: not ejected).
    ejected_until_ns: AtomicU64,
    /// Ejections so far; each one lasts this many base ejection times.
    ejections: AtomicU32,
}

/// How one attempt ended, as outlier detection and the latency average see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Status(u16),
    /// No response: refused, reset, or timed out.
    Failure,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Endpoint {
    fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until_ns.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency scaled by the work queued on the endpoint.
    ///
    /// An endpoint never observed costs nothing while no request waits on
    /// it, so a new endpoint is tried at once (a scale-out gets traffic
    /// under any load), and [`DEFAULT_RTT`] per request sent to it before
    /// it answers, so a burst does not all land there. An idle endpoint's
    /// estimate decays towards zero (as in Finagle and tower): with
    /// requests one at a time, the slower of three endpoints is never in
    /// the cheaper of two, and without the decay it would never be tried
    /// again.
    fn cost(&self, now: u64) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        match self.ewma_ns.load(Ordering::Relaxed) {
            0 => DEFAULT_RTT.as_nanos() as f64 * pending,
            ns => {
                let age = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
                ns as f64 * (-age / DECAY.as_nanos() as f64).exp() * (pending + 1.0)
            }
        }
    }

    fn observe_latency(&self, rtt: Duration, now: u64) {
        let rtt = rtt.as_nanos() as f64;
        let prev = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let age = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        let next = if prev == 0.0 || rtt > prev {
            rtt // a peak is taken at once, recovery is gradual
        } else {
            let w = (-age / DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
    }
}

/// An endpoint chosen for one attempt; dropping it ends the attempt.
pub struct Pick {
    pub addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    started: Instant,
}

impl Pick {
    /// Counts the attempt as pending on `endpoint` until the pick drops.
    fn new(addr: SocketAddr, endpoint: &Arc<Endpoint>) -> Pick {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Pick {
            addr,
            endpoint: endpoint.clone(),
            started: Instant::now(),
        }
    }

    /// Leaves `spent` (opening a connection for the attempt) out of the
    /// latency it records: a new connection's handshakes are not the
    /// endpoint's answer time, and as a peak they would keep it out of
    /// the cheaper of two for many seconds at low load.
    pub fn set_aside(&mut self, spent: Duration) {
        self.started += spent;
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What identifies a request for consistent hashing.
pub struct HashInput<'a> {
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
    pub source_ip: Option<std::net::IpAddr>,
}

impl Cluster {
    fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        if let Some(e) = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            return e.clone();
        }
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// The locality groups of this snapshot's endpoints; `compute` runs
    /// only for a snapshot not seen before.
    pub fn groups(
        &self,
        generation: u64,
        ipv4: bool,
        compute: impl FnOnce() -> Option<Groups>,
    ) -> Option<Arc<Groups>> {
        let key = (generation, ipv4);
        if let Some((k, groups)) = &*self.groups.read().unwrap_or_else(|e| e.into_inner()) {
            if *k == key {
                return groups.clone();
            }
        }
        let groups = compute().map(Arc::new);
        *self.groups.write().unwrap_or_else(|e| e.into_inner()) = Some((key, groups.clone()));
        groups
    }

    /// [`Cluster::pick`] within the locality group a request goes to: the
    /// best priority with an endpoint not ejected, or one chosen by weight
    /// among those with one. With every endpoint ejected, the first
    /// priority (or any group) in panic mode, as Envoy.
    pub fn pick_grouped(
        &self,
        groups: Option<&Groups>,
        candidates: &[SocketAddr],
        avoid: &[SocketAddr],
        lb: Option<&LoadBalancer>,
        hash: &HashInput<'_>,
    ) -> Option<Pick> {
        let now = now_ns();
        let pool = match groups {
            Some(groups) => self.group(groups, now),
            None => candidates,
        };
        self.pick_at(pool, avoid, lb, hash, now)
    }

    /// The endpoints of the group a request goes to now.
    fn group<'g>(&self, groups: &'g Groups, now: u64) -> &'g [SocketAddr] {
        let live = |addrs: &[SocketAddr]| addrs.iter().any(|&a| !self.endpoint(a).is_ejected(now));
        match groups {
            Groups::Priorities(tiers) => tiers
                .iter()
                .find(|t| live(t))
                .or(tiers.first())
                .map_or(&[], Vec::as_slice),
            Groups::Weighted(groups) => {
                let healthy: Vec<_> = groups.iter().filter(|(_, a)| live(a)).collect();
                let pool = if healthy.is_empty() {
                    groups.iter().collect()
                } else {
                    healthy
                };
                let total: u32 = pool.iter().map(|(w, _)| w).sum();
                let mut roll = fastrand::u32(..total.max(1));
                pool.iter()
                    .find(|(w, _)| {
                        let hit = roll < *w;
                        roll = roll.saturating_sub(*w);
                        hit
                    })
                    .map_or(&[], |(_, a)| a.as_slice())
            }
        }
    }

    /// Picks one of `candidates` (the cluster's current endpoints), avoiding
    /// ejected endpoints and those in `avoid` (already tried by this
    /// request) while any other is left. `None` only when there are none.
    pub fn pick(
        &self,
        candidates: &[SocketAddr],
        avoid: &[SocketAddr],
        lb: Option<&LoadBalancer>,
        hash: &HashInput<'_>,
    ) -> Option<Pick> {
        self.pick_at(candidates, avoid, lb, hash, now_ns())
    }

    /// [`Cluster::pick`] at time `now` (tests move it).
    fn pick_at(
        &self,
        candidates: &[SocketAddr],
        avoid: &[SocketAddr],
        lb: Option<&LoadBalancer>,
        hash: &HashInput<'_>,
        now: u64,
    ) -> Option<Pick> {
        if let [addr] = candidates {
            // Healthy or not (panic mode), tried or not: the only one.
            return Some(Pick::new(*addr, &self.endpoint(*addr)));
        }
        let all: Vec<(SocketAddr, Arc<Endpoint>)> =
            candidates.iter().map(|&a| (a, self.endpoint(a))).collect();
        let healthy: Vec<_> = all.iter().filter(|(_, e)| !e.is_ejected(now)).collect();
        // Envoy's panic mode: with every endpoint ejected, use them all.
        let pool = if healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        let fresh: Vec<_> = pool
            .iter()
            .filter(|(a, _)| !avoid.contains(a))
            .copied()
            .collect();
        let pool = if fresh.is_empty() { pool } else { fresh };
        let (addr, endpoint) = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => pool[self.choose(n, &pool, lb, hash, now)],
        };
        Some(Pick::new(*addr, endpoint))
    }

    fn choose(
        &self,
        n: usize,
        pool: &[&(SocketAddr, Arc<Endpoint>)],
        lb: Option<&LoadBalancer>,
        hash: &HashInput<'_>,
        now: u64,
    ) -> usize {
        let two_choices = |cost: &dyn Fn(&Endpoint) -> f64| {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            if cost(&pool[b].1) < cost(&pool[a].1) {
                b
            } else {
                a
            }
        };
        match lb {
            None => two_choices(&|e| e.cost(now)),
            Some(LoadBalancer::LeastRequest) => {
                two_choices(&|e| e.pending.load(Ordering::Relaxed) as f64)
            }
            Some(LoadBalancer::RoundRobin) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Some(LoadBalancer::Random) => fastrand::usize(..n),
            Some(LoadBalancer::ConsistentHash(key)) => match hash_key(key, hash) {
                // Rendezvous hashing: only the keys of a removed endpoint move.
                Some(k) => (0..n)
                    .max_by_key(|&i| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        (&k, pool[i].0).hash(&mut h);
                        h.finish()
                    })
                    .unwrap_or(0),
                None => fastrand::usize(..n),
            },
        }
    }

    /// Records how an attempt ended; ejects the endpoint when it has failed
    /// `outlier`'s consecutive limit, within `maxEjectionPercent` of
    /// `cluster_size` endpoints.
    pub fn observe(
        &self,
        pick: &Pick,
        seen: Observation,
        outlier: Option<&OutlierDetection>,
        cluster_size: usize,
    ) {
        let now = now_ns();
        let e = &pick.endpoint;
        e.observe_latency(pick.started.elapsed(), now);
        let (is_5xx, is_gateway) = match seen {
            Observation::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Observation::Failure => (true, true),
        };
        if !is_5xx {
            e.consecutive_5xx.store(0, Ordering::Relaxed);
            e.consecutive_gateway.store(0, Ordering::Relaxed);
            return;
        }
        let fives = e.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let gateways = if is_gateway {
            e.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            e.consecutive_gateway.swap(0, Ordering::Relaxed);
            0
        };
        let Some(od) = outlier else { return };
        let tripped = (od.consecutive_5xx_errors > 0 && fives >= od.consecutive_5xx_errors)
            || (od.consecutive_gateway_errors > 0 && gateways >= od.consecutive_gateway_errors);
        if !tripped || e.is_ejected(now) {
            return;
        }
        let ejected = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.is_ejected(now))
            .count();
        // Envoy always allows one ejection, whatever the percentage.
        let allowed = (cluster_size * od.max_ejection_percent as usize / 100).max(1);
        let healthy_after = (cluster_size - ejected.min(cluster_size)).saturating_sub(1);
        if ejected >= allowed || healthy_after * 100 < cluster_size * od.min_health_percent as usize
        {
            return;
        }
        let times = e.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let until = now + (od.base_ejection_time * times).as_nanos() as u64;
        e.ejected_until_ns.store(until, Ordering::Relaxed);
        e.consecutive_5xx.store(0, Ordering::Relaxed);
        e.consecutive_gateway.store(0, Ordering::Relaxed);
        log::info!(
            "ejected endpoint {} for {:?} after consecutive failures",
            pick.addr,
            od.base_ejection_time * times
        );
    }

    /// Endpoints ejected now, for `nodemesh routes`.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = now_ns();
        let mut out: Vec<_> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.is_ejected(now))
            .map(|(a, _)| *a)
            .collect();
        out.sort();
        out
    }
}

fn hash_key<'a>(key: &HashKey, input: &HashInput<'a>) -> Option<String> {
    match key {
        HashKey::Header(name) => input
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        HashKey::Cookie(name) => input
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| v.to_owned())
            }),
        HashKey::QueryParameter(name) => input.query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| v.to_owned())
        }),
        HashKey::SourceIp => input.source_ip.map(|ip| ip.to_string()),
    }
}

/// Clusters of the node, created on first use and kept across reloads.
#[derive(Default)]
pub struct Clusters(RwLock<HashMap<ClusterKey, Arc<Cluster>>>);

impl Clusters {
    pub fn get(&self, key: &ClusterKey) -> Arc<Cluster> {
        if let Some(c) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return c.clone();
        }
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Ejected endpoints per cluster, for `nodemesh routes`.
    pub fn ejections(&self) -> Vec<(ClusterKey, Vec<SocketAddr>)> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, c)| (k.clone(), c.ejected()))
            .filter(|(_, e)| !e.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    fn no_hash() -> HashInput<'static> {
        static EMPTY: std::sync::OnceLock<http::HeaderMap> = std::sync::OnceLock::new();
        HashInput {
            headers: EMPTY.get_or_init(http::HeaderMap::new),
            query: None,
            source_ip: None,
        }
    }

    /// Ejects for a minute after `failures` consecutive 5xx, at most 10 %.
    fn ejecting_after(failures: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: failures,
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 10,
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let cluster = Cluster::default();
        let eps = addrs(3);
        let picked: Vec<_> = (0..6)
            .map(|_| {
                cluster
                    .pick(&eps, &[], Some(&LoadBalancer::RoundRobin), &no_hash())
                    .unwrap()
                    .addr
            })
            .collect();
        assert_eq!(&picked[..3], &picked[3..]);
        for e in &eps {
            assert!(picked.contains(e));
        }
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint() {
        let cluster = Cluster::default();
        let eps = addrs(2);
        let slow = cluster.endpoint(eps[0]);
        slow.observe_latency(Duration::from_millis(50), now_ns());
        let fast = cluster.endpoint(eps[1]);
        fast.observe_latency(Duration::from_micros(200), now_ns());
        let fast_picks = (0..100)
            .filter(|_| cluster.pick(&eps, &[], None, &no_hash()).unwrap().addr == eps[1])
            .count();
        assert_eq!(fast_picks, 100);
    }

    #[test]
    fn the_time_a_new_connection_took_to_open_is_not_latency() {
        let cluster = Cluster::default();
        let eps = addrs(2);
        cluster
            .endpoint(eps[1])
            .observe_latency(Duration::from_millis(5), now_ns());
        // eps[0] answered 50 ms after it was picked, 49 of them spent
        // opening a connection (TCP, TLS, an HBONE stream).
        let mut pick = cluster.pick(&eps[..1], &[], None, &no_hash()).unwrap();
        pick.started -= Duration::from_millis(50);
        pick.set_aside(Duration::from_millis(49));
        cluster.observe(&pick, Observation::Status(200), None, eps.len());
        drop(pick);
        // Its 1 ms against the other's 5: it stays the cheaper one.
        let picks = (0..50)
            .filter(|_| cluster.pick(&eps, &[], None, &no_hash()).unwrap().addr == eps[0])
            .count();
        assert_eq!(picks, 50);
    }

    /// Requests one at a time to three endpoints, one of them new: the new
    /// one is tried at once, and the one left slowest is tried again once
    /// its estimate has decayed below the others'.
    #[test]
    fn peak_ewma_tries_new_endpoints_and_starves_none() {
        let cluster = Cluster::default();
        let eps = addrs(3);
        let now = now_ns();
        for (addr, rtt) in [(eps[0], 300), (eps[1], 600)] {
            cluster
                .endpoint(addr)
                .observe_latency(Duration::from_micros(rtt), now);
        }
        let picked: Vec<_> = (0..30)
            .map(|_| cluster.pick(&eps, &[], None, &no_hash()).unwrap().addr)
            .collect();
        assert!(picked.contains(&eps[2]), "the new endpoint: {picked:?}");

        // 30 s later, the slowest beats the others just used.
        let later = now + 30_000_000_000;
        for addr in [eps[0], eps[2]] {
            cluster
                .endpoint(addr)
                .observe_latency(Duration::from_micros(100), later);
        }
        let picked: Vec<_> = (0..30)
            .map(|_| {
                let pick = cluster.pick_at(&eps, &[], None, &no_hash(), later);
                pick.unwrap().addr
            })
            .collect();
        assert!(picked.contains(&eps[1]), "the idle slow one: {picked:?}");
    }

    #[test]
    fn consecutive_failures_eject_within_the_allowed_share() {
        let cluster = Cluster::default();
        let eps = addrs(3);
        let od = ejecting_after(2);
        for addr in [eps[0], eps[0], eps[1], eps[1]] {
            let pick = cluster.pick(&[addr], &[], None, &no_hash()).unwrap();
            cluster.observe(&pick, Observation::Status(503), Some(&od), eps.len());
        }
        // 10 % of 3 rounds down to 0, but one ejection is always allowed.
        assert_eq!(cluster.ejected(), vec![eps[0]]);
        for _ in 0..20 {
            assert_ne!(
                cluster.pick(&eps, &[], None, &no_hash()).unwrap().addr,
                eps[0]
            );
        }
        // A request that already tried the others may still use it... no:
        // ejected endpoints are skipped while any other is healthy.
        let p = cluster
            .pick(&eps, &[eps[1], eps[2]], None, &no_hash())
            .unwrap();
        assert_ne!(p.addr, eps[0]);
    }

    #[test]
    fn a_lone_endpoint_is_picked_ejected_or_tried_and_counted_pending() {
        let cluster = Cluster::default();
        let eps = addrs(1);
        let od = ejecting_after(1);
        let pick = cluster.pick(&eps, &[], None, &no_hash()).unwrap();
        cluster.observe(&pick, Observation::Status(503), Some(&od), eps.len());
        drop(pick);
        assert_eq!(cluster.ejected(), eps);
        // Panic mode, and nothing else to try.
        let pick = cluster.pick(&eps, &eps, None, &no_hash()).unwrap();
        assert_eq!(pick.addr, eps[0]);
        let endpoint = cluster.endpoint(eps[0]);
        assert_eq!(endpoint.pending.load(Ordering::Relaxed), 1);
        drop(pick);
        assert_eq!(endpoint.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn locality_priorities_fail_over_to_the_next_tier_only_when_one_is_all_ejected() {
        let cluster = Cluster::default();
        let eps = addrs(3);
        let groups = Groups::Priorities(vec![vec![eps[0]], vec![eps[1], eps[2]]]);
        let pick = |avoid: &[SocketAddr]| {
            cluster
                .pick_grouped(Some(&groups), &eps, avoid, None, &no_hash())
                .unwrap()
                .addr
        };
        for _ in 0..20 {
            assert_eq!(pick(&[]), eps[0]);
        }
        // Tried but not ejected: still the best tier.
        assert_eq!(pick(&[eps[0]]), eps[0]);
        let od = ejecting_after(1);
        let failed = cluster.pick(&[eps[0]], &[], None, &no_hash()).unwrap();
        cluster.observe(&failed, Observation::Failure, Some(&od), eps.len());
        for _ in 0..20 {
            assert_ne!(pick(&[]), eps[0]);
        }
    }

    #[test]
    fn locality_weights_split_traffic_and_skip_an_ejected_group() {
        let cluster = Cluster::default();
        let eps = addrs(2);
        let groups = Groups::Weighted(vec![(20, vec![eps[0]]), (80, vec![eps[1]])]);
        let pick = || {
            cluster
                .pick_grouped(Some(&groups), &eps, &[], None, &no_hash())
                .unwrap()
                .addr
        };
        let second = (0..2000).filter(|_| pick() == eps[1]).count();
        assert!((1500..=1700).contains(&second), "{second} of 2000");
        let failed = cluster.pick(&[eps[1]], &[], None, &no_hash()).unwrap();
        cluster.observe(&failed, Observation::Failure, Some(&ejecting_after(1)), 2);
        assert!((0..50).all(|_| pick() == eps[0]));
    }

    #[test]
    fn consistent_hash_is_stable_per_key() {
        let cluster = Cluster::default();
        let eps = addrs(5);
        let lb = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        let input = HashInput {
            headers: &headers,
            query: None,
            source_ip: None,
        };
        let first = cluster.pick(&eps, &[], Some(&lb), &input).unwrap().addr;
        for _ in 0..10 {
            assert_eq!(
                cluster.pick(&eps, &[], Some(&lb), &input).unwrap().addr,
                first
            );
        }
    }
}
