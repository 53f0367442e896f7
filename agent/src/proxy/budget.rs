//! The proxy's descriptor budget, shared fairly by the tenants of the node.
//!
//! Every socket the proxy opens for a workload is charged to that workload
//! (its *tenant*) for as long as it is open: the accepted client side, the
//! upstream side, pooled L7 connections, upgraded tunnels and forwarded DNS
//! queries. The node's open-file limit minus what the agent keeps for itself
//! (see [`derive`]) is split evenly between enrolled workloads, so one tenant
//! can never take another's descriptors and an `accept` never fails with
//! `EMFILE`. Enrollment changes move the split at once; connections already
//! open are never dropped, but a workload over its new share gets no new ones
//! until it is back under it.
//!
//! Inbound, a workload's share is also fair between its callers: after
//! admitting a connection, one caller never holds more of the workload's
//! descriptors than stay free for everyone else (see [`Tenant::charge`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Direction;
use crate::nofile::Nofile;

/// Descriptors one proxied connection costs: the client's side and the
/// upstream's.
pub const FDS_PER_CONNECTION: usize = 2;
/// Descriptors kept for the agent on top of those it holds once its data
/// path is loaded: admin connections, config reloads, eBPF reloads, logs.
pub const AGENT_HEADROOM: usize = 128;
/// Descriptors each enrolled workload costs outside its connections: its
/// listeners (outbound IPv4 and IPv6, inbound), DNS socket, namespace handle,
/// `sk_lookup` link, one accepted socket per listener before it is
/// admitted or reset, and a duplicate of each listener and of the DNS
/// socket, kept to hand them over to the next agent.
pub const WORKLOAD_FDS: usize = 16;
/// The agent refuses to start with fewer descriptors than this for
/// connections.
pub const MIN_CONNECTION_FDS: usize = 64;

/// The limits that follow from the open-file limit and enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Derived {
    /// Descriptors for connections, node-wide.
    pub connection_fds: usize,
    /// Each workload's fair share of them, in connections.
    pub max_connections_per_workload: usize,
    /// `--max-connections-per-workload` asked for more than the fair share
    /// and was lowered to it.
    pub clamped: bool,
}

/// Descriptors left for connections and listeners under `nofile` once the
/// agent's `reserved` ones are set aside.
fn budget(nofile: Nofile, reserved: usize) -> usize {
    usize::try_from(nofile.soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(reserved)
}

/// Splits `budget` (descriptors left once the agent's own are reserved)
/// between `workloads`: each gets `budget / workloads` after the fixed cost
/// of every workload's listeners. An explicit `flag` may lower a workload's
/// share, never raise it: above the fair share, tenants could deny each
/// other the node's descriptors.
pub fn derive(budget: usize, workloads: usize, flag: Option<usize>) -> Derived {
    let connection_fds = budget.saturating_sub(workloads * WORKLOAD_FDS);
    let fair = connection_fds / workloads.max(1) / FDS_PER_CONNECTION;
    let (max_connections_per_workload, clamped) = match flag {
        Some(n) if n > fair => (fair, true),
        Some(n) => (n, false),
        None => (fair, false),
    };
    Derived {
        connection_fds,
        max_connections_per_workload,
        clamped,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "RLIMIT_NOFILE is {soft} (hard {hard}) and the agent keeps {reserved} descriptors for \
         itself: fewer than {MIN_CONNECTION_FDS} would be left for connections. Raise the hard \
         limit (systemd: LimitNOFILE=1048576; a shell: ulimit -Hn)"
    )]
    TooLow {
        soft: u64,
        hard: u64,
        reserved: usize,
    },
}

/// The node's descriptor budget.
pub struct Descriptors {
    nofile: Nofile,
    /// Descriptors the agent keeps for itself.
    reserved: usize,
    /// `--max-connections-per-workload`, if given.
    flag: Option<usize>,
    /// What the last enrollment change derived.
    derived: Mutex<(usize, Derived)>,
    /// Each workload's share, in descriptors (hot-path copy of `derived`).
    per_workload_fds: AtomicUsize,
    /// Descriptors charged node-wide: to tenants, and to enrolled
    /// workloads' listeners. Never more than the budget.
    in_use: AtomicUsize,
}

/// What `nodemesh status` shows.
#[derive(Debug, Serialize)]
pub struct BudgetStatus {
    pub nofile: Nofile,
    pub reserved_for_agent: usize,
    pub reserved_per_workload: usize,
    pub workloads: usize,
    pub connection_descriptors: usize,
    pub descriptors_in_use: usize,
    pub max_connections_per_workload: usize,
    /// `derived`, `flag`, or `flag lowered to the fair share`.
    pub max_connections_from: &'static str,
}

impl Descriptors {
    /// The budget of an agent running under `nofile` that holds `open`
    /// descriptors now (its data path loaded), before any enrollment.
    pub fn new(nofile: Nofile, open: usize, flag: Option<usize>) -> Result<Self, BudgetError> {
        let reserved = open + AGENT_HEADROOM;
        let budget = budget(nofile, reserved);
        if budget < MIN_CONNECTION_FDS {
            return Err(BudgetError::TooLow {
                soft: nofile.soft,
                hard: nofile.hard,
                reserved,
            });
        }
        let descriptors = Descriptors {
            nofile,
            reserved,
            flag,
            derived: Mutex::new((0, derive(budget, 0, flag))),
            per_workload_fds: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
        };
        descriptors.set_workloads(0);
        Ok(descriptors)
    }

    /// Re-splits the budget when the number of enrolled workloads changes.
    pub fn set_workloads(&self, workloads: usize) {
        let derived = derive(budget(self.nofile, self.reserved), workloads, self.flag);
        let mut last = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        self.per_workload_fds.store(
            derived.max_connections_per_workload * FDS_PER_CONNECTION,
            Ordering::Relaxed,
        );
        if *last != (workloads, derived) {
            log::info!(
                "{workloads} workload(s) enrolled: at most {} connections each ({} descriptors \
                 for connections on this node)",
                derived.max_connections_per_workload,
                derived.connection_fds
            );
            if derived.clamped && !last.1.clamped {
                log::warn!(
                    "--max-connections-per-workload {} is more than each workload's fair share \
                     of the open-file limit: lowered to {}",
                    self.flag.unwrap_or_default(),
                    derived.max_connections_per_workload
                );
            }
        }
        *last = (workloads, derived);
    }

    pub fn status(&self) -> BudgetStatus {
        let (workloads, derived) = *self.derived.lock().unwrap_or_else(|e| e.into_inner());
        BudgetStatus {
            nofile: self.nofile,
            reserved_for_agent: self.reserved,
            reserved_per_workload: WORKLOAD_FDS,
            workloads,
            connection_descriptors: derived.connection_fds,
            descriptors_in_use: self.in_use.load(Ordering::Relaxed),
            max_connections_per_workload: derived.max_connections_per_workload,
            max_connections_from: match (self.flag, derived.clamped) {
                (None, _) => "derived",
                (Some(_), false) => "flag",
                (Some(_), true) => "flag lowered to the fair share",
            },
        }
    }

    /// Charges an enrolling workload's listeners to the node, so that
    /// enrolling never takes descriptors that connections hold.
    pub fn reserve_listeners(self: &Arc<Self>) -> Result<Listeners, Refused> {
        if self.take(WORKLOAD_FDS) {
            Ok(Listeners { node: self.clone() })
        } else {
            Err(Refused::Node)
        }
    }

    /// Takes `count` from the node's budget, if it has them.
    fn take(&self, count: usize) -> bool {
        let limit = budget(self.nofile, self.reserved);
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + count <= limit).then_some(used + count)
            })
            .is_ok()
    }

    fn give_back(&self, count: usize) {
        self.in_use.fetch_sub(count, Ordering::AcqRel);
    }
}

/// The fixed descriptors of an enrolled workload, charged until dropped.
pub struct Listeners {
    node: Arc<Descriptors>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.node.give_back(WORKLOAD_FDS);
    }
}

/// Who holds an inbound connection, for fairness between callers. Today the
/// peer's address (not authenticated); with mutual TLS, its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerKey {
    Address(IpAddr),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the workload holds all {0} descriptors of its share")]
    Workload(usize),
    #[error("this caller already holds half of the workload's free descriptors")]
    Caller,
    #[error("the node's proxy has no descriptors left")]
    Node,
}

#[derive(Default)]
struct Held {
    total: usize,
    /// Inbound descriptors per caller; callers holding none are removed.
    by_caller: HashMap<CallerKey, usize>,
}

/// One workload's share of the budget.
pub struct Tenant {
    node: Arc<Descriptors>,
    held: Mutex<Held>,
    rejected_outbound: AtomicU64,
    rejected_inbound: AtomicU64,
}

/// One workload's usage, as `nodemesh status` shows it.
#[derive(Debug, Serialize)]
pub struct TenantUsage {
    pub descriptors: usize,
    pub inbound_callers: usize,
    pub rejected_outbound: u64,
    pub rejected_inbound: u64,
}

impl Tenant {
    pub fn new(node: Arc<Descriptors>) -> Arc<Tenant> {
        Arc::new(Tenant {
            node,
            held: Mutex::default(),
            rejected_outbound: AtomicU64::new(0),
            rejected_inbound: AtomicU64::new(0),
        })
    }

    /// Charges `count` descriptors to the workload, on behalf of `caller`
    /// for inbound connections. Refused when the workload's share or the
    /// node's budget would be exceeded, or when the caller would then hold
    /// more of the share than stays free for everyone else: a single
    /// caller can take at most half of a workload's share, and every new
    /// caller finds room until many callers each hold a large part of it.
    pub fn charge(
        self: &Arc<Self>,
        count: usize,
        caller: Option<CallerKey>,
    ) -> Result<Fds, Refused> {
        let limit = self.node.per_workload_fds.load(Ordering::Relaxed);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let total = held.total + count;
        if total > limit {
            return Err(Refused::Workload(limit));
        }
        if let Some(caller) = caller {
            let by_caller = held.by_caller.get(&caller).copied().unwrap_or(0) + count;
            if by_caller > limit - total {
                return Err(Refused::Caller);
            }
        }
        if !self.node.take(count) {
            return Err(Refused::Node);
        }
        held.total = total;
        if let Some(caller) = caller {
            *held.by_caller.entry(caller).or_default() += count;
        }
        Ok(Fds {
            tenant: self.clone(),
            caller,
            count,
        })
    }

    /// Counts a connection or request refused for lack of descriptors.
    pub fn count_rejection(&self, direction: Direction) {
        match direction {
            Direction::Outbound => &self.rejected_outbound,
            Direction::Inbound => &self.rejected_inbound,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn usage(&self) -> TenantUsage {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        TenantUsage {
            descriptors: held.total,
            inbound_callers: held.by_caller.len(),
            rejected_outbound: self.rejected_outbound.load(Ordering::Relaxed),
            rejected_inbound: self.rejected_inbound.load(Ordering::Relaxed),
        }
    }

    fn release(&self, count: usize, caller: Option<CallerKey>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.total -= count;
        if let Some(caller) = caller {
            if let Some(n) = held.by_caller.get_mut(&caller) {
                *n -= count;
                if *n == 0 {
                    held.by_caller.remove(&caller);
                }
            }
        }
        self.node.give_back(count);
    }
}

/// Descriptors charged to a tenant until dropped.
pub struct Fds {
    tenant: Arc<Tenant>,
    caller: Option<CallerKey>,
    count: usize,
}

impl Fds {
    /// Moves one of these descriptors into a charge of its own (for the
    /// socket that will use it), if there is one.
    pub fn split_one(&mut self) -> Option<Fds> {
        (self.count > 0).then(|| {
            self.count -= 1;
            Fds {
                tenant: self.tenant.clone(),
                caller: self.caller,
                count: 1,
            }
        })
    }

    /// Gives back all but `keep` of these descriptors.
    pub fn keep(&mut self, keep: usize) {
        if self.count > keep {
            self.tenant.release(self.count - keep, self.caller);
            self.count = keep;
        }
    }
}

impl Drop for Fds {
    fn drop(&mut self) {
        if self.count > 0 {
            self.tenant.release(self.count, self.caller);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile(limit: u64) -> Nofile {
        Nofile {
            was: 1024,
            soft: limit,
            hard: limit,
        }
    }

    /// A node whose workloads have `per_workload` connections each.
    fn node(per_workload: usize, workloads: usize) -> Arc<Descriptors> {
        let budget = workloads * (WORKLOAD_FDS + per_workload * FDS_PER_CONNECTION);
        let open = 10;
        let limit = (budget + open + AGENT_HEADROOM) as u64;
        let node = Descriptors::new(nofile(limit), open, None).unwrap();
        node.set_workloads(workloads);
        assert_eq!(node.status().max_connections_per_workload, per_workload);
        Arc::new(node)
    }

    fn caller(last: u8) -> Option<CallerKey> {
        Some(CallerKey::Address(IpAddr::from([10, 0, 0, last])))
    }

    #[test]
    fn the_limit_is_split_evenly_between_workloads_after_fixed_costs() {
        // 1024 descriptors, 40 held at start: 856 for workloads.
        let node = Descriptors::new(nofile(1024), 40, None).unwrap();
        node.set_workloads(2);
        let s = node.status();
        assert_eq!(s.reserved_for_agent, 40 + AGENT_HEADROOM);
        assert_eq!(s.connection_descriptors, 856 - 2 * WORKLOAD_FDS);
        assert_eq!(s.max_connections_per_workload, (856 - 32) / 2 / 2);
        assert_eq!(s.max_connections_from, "derived");
        node.set_workloads(4);
        assert_eq!(
            node.status().max_connections_per_workload,
            (856 - 64) / 4 / 2
        );
        // Nothing enrolled: one workload's share, never a division by zero.
        assert_eq!(derive(1000, 0, None).max_connections_per_workload, 500);
    }

    #[test]
    fn an_explicit_flag_may_lower_the_share_but_not_raise_it() {
        assert_eq!(
            derive(10_000, 2, Some(100)),
            Derived {
                connection_fds: 10_000 - 32,
                max_connections_per_workload: 100,
                clamped: false
            }
        );
        let clamped = derive(10_000, 2, Some(1_000_000));
        assert!(clamped.clamped);
        assert_eq!(clamped.max_connections_per_workload, (10_000 - 32) / 4);
        let node = Descriptors::new(nofile(1024), 40, Some(1_000_000)).unwrap();
        assert_eq!(
            node.status().max_connections_from,
            "flag lowered to the fair share"
        );
    }

    #[test]
    fn a_limit_too_low_for_any_connection_is_refused_with_the_way_out() {
        let e = Descriptors::new(nofile(150), 40, None).err().unwrap();
        let message = e.to_string();
        assert!(message.contains("RLIMIT_NOFILE is 150"), "{message}");
        assert!(message.contains("LimitNOFILE"), "{message}");
    }

    #[test]
    fn a_workload_cannot_take_more_than_its_share_and_gets_it_back() {
        let node = node(10, 2);
        let (greedy, other) = (Tenant::new(node.clone()), Tenant::new(node.clone()));
        let held: Vec<Fds> = (0..10).map(|_| greedy.charge(2, None).unwrap()).collect();
        assert_eq!(greedy.charge(2, None).err(), Some(Refused::Workload(20)));
        // The other tenant's share is untouched.
        let theirs: Vec<Fds> = (0..10).map(|_| other.charge(2, None).unwrap()).collect();
        drop(held);
        assert_eq!(greedy.usage().descriptors, 0);
        assert_eq!(node.status().descriptors_in_use, 20);
        drop(theirs);
        assert_eq!(node.status().descriptors_in_use, 0);
    }

    #[test]
    fn enrollment_shrinks_shares_without_dropping_what_is_held() {
        // 112 descriptors for workloads: 48 connections for one, 20 each for two.
        let node = Arc::new(Descriptors::new(nofile(250), 10, None).unwrap());
        let first_listeners = node.reserve_listeners().unwrap();
        node.set_workloads(1);
        let first = Tenant::new(node.clone());
        let held: Vec<Fds> = (0..30).map(|_| first.charge(2, None).unwrap()).collect();
        // A second workload arrives: the first is now over its share.
        let second_listeners = node.reserve_listeners().unwrap();
        node.set_workloads(2);
        assert_eq!(node.status().max_connections_per_workload, 20);
        assert_eq!(first.charge(2, None).err(), Some(Refused::Workload(40)));
        assert_eq!(first.usage().descriptors, 60);
        // The newcomer gets what the node has left, never more.
        let second = Tenant::new(node.clone());
        let mut theirs = Vec::new();
        while let Ok(fds) = second.charge(2, None) {
            theirs.push(fds);
        }
        assert_eq!(theirs.len(), 10);
        assert_eq!(second.charge(2, None).err(), Some(Refused::Node));
        // Once the first drains, the newcomer gets its whole share.
        drop(held);
        while let Ok(fds) = second.charge(2, None) {
            theirs.push(fds);
        }
        assert_eq!(theirs.len(), 20);
        drop((theirs, first_listeners, second_listeners));
        assert_eq!(node.status().descriptors_in_use, 0);
    }

    #[test]
    fn a_workload_is_not_enrolled_with_descriptors_connections_hold() {
        let node = node(40, 1);
        let listeners = node.reserve_listeners().unwrap();
        let tenant = Tenant::new(node.clone());
        let held: Vec<Fds> = (0..40).map(|_| tenant.charge(2, None).unwrap()).collect();
        assert_eq!(node.reserve_listeners().err(), Some(Refused::Node));
        drop(held);
        assert!(node.reserve_listeners().is_ok());
        drop(listeners);
    }

    #[test]
    fn one_caller_cannot_lock_others_out_of_a_workload() {
        let node = node(100, 1);
        let server = Tenant::new(node);
        let mut attacker = Vec::new();
        while let Ok(fds) = server.charge(2, caller(66)) {
            attacker.push(fds);
        }
        // Alone, it gets half of the share.
        assert_eq!(attacker.len(), 50);
        assert_eq!(server.charge(2, caller(66)).err(), Some(Refused::Caller));
        // A victim still gets in, and so does a third caller after it.
        let mut victim = Vec::new();
        while let Ok(fds) = server.charge(2, caller(7)) {
            victim.push(fds);
        }
        assert_eq!(victim.len(), 25);
        assert!(server.charge(2, caller(8)).is_ok());
        // Many greedy callers: each newcomer still finds room for a while.
        let mut others = Vec::new();
        for last in 100..105 {
            let before = others.len();
            while let Ok(fds) = server.charge(2, caller(last)) {
                others.push(fds);
            }
            assert!(others.len() > before, "caller {last} got nothing");
        }
        drop(attacker);
        drop(victim);
        drop(others);
        assert_eq!(server.usage().descriptors, 0);
        assert_eq!(server.usage().inbound_callers, 0);
    }

    #[test]
    fn split_and_keep_move_descriptors_without_losing_any() {
        let node = node(40, 1);
        let tenant = Tenant::new(node.clone());
        let mut connection = tenant.charge(2, caller(1)).unwrap();
        let upstream = connection.split_one().unwrap();
        connection.keep(1);
        assert_eq!(tenant.usage().descriptors, 2);
        drop(connection);
        assert_eq!(tenant.usage().descriptors, 1);
        assert_eq!(tenant.usage().inbound_callers, 1);
        drop(upstream);
        assert_eq!(tenant.usage().descriptors, 0);
        assert_eq!(tenant.usage().inbound_callers, 0);
        assert_eq!(node.status().descriptors_in_use, 0);
    }
}
