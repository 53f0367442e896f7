//! Finding a pod's network namespace without a CNI plugin's help.
//!
//! First by the pod's UID in the cgroup paths of processes (`/proc/*/cgroup`): the kubelet
//! names each pod's cgroup after its UID, `kubepods-<qos>-pod<uid with _>.slice` with the
//! systemd driver (containerd, CRI-O) and `pod<uid>` with cgroupfs. Failing that, by the
//! pod's address: the network namespace, other than the agent's own, that holds it as a
//! local address, if exactly one does (enrolling the wrong namespace would hand one
//! tenant's traffic to another, so an address held twice is no answer). Either way the
//! namespace is named by `/proc/<pid>/ns/net` of the lowest such process (usually the
//! pod's sandbox, which lives as long as the pod).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

const PROC: &str = "/proc";

/// `uid → /proc/<pid>/ns/net` for those of `pods` (UID, addresses) found.
pub(super) fn discover(pods: &[(String, Vec<IpAddr>)]) -> HashMap<String, PathBuf> {
    if pods.is_empty() {
        return HashMap::new();
    }
    let pids = pids();
    let wanted: HashSet<&str> = pods.iter().map(|(uid, _)| uid.as_str()).collect();
    let mut found: HashMap<String, u32> = HashMap::new();
    for &pid in &pids {
        let Ok(cgroups) = fs::read_to_string(format!("{PROC}/{pid}/cgroup")) else {
            continue;
        };
        let Some(uid) = cgroups.lines().find_map(pod_uid) else {
            continue;
        };
        if wanted.contains(uid.as_str()) {
            let lowest = found.entry(uid).or_insert(pid);
            *lowest = (*lowest).min(pid);
        }
    }
    let unfound: Vec<&(String, Vec<IpAddr>)> = pods
        .iter()
        .filter(|(uid, _)| !found.contains_key(uid))
        .collect();
    if !unfound.is_empty() {
        let holders = address_holders(&pids);
        for (uid, addresses) in unfound {
            let holder = addresses.iter().find_map(|ip| holders.get(ip));
            if let Some(&Some(pid)) = holder {
                found.insert(uid.clone(), pid);
            }
        }
    }
    found
        .into_iter()
        .map(|(uid, pid)| (uid, PathBuf::from(format!("{PROC}/{pid}/ns/net"))))
        .collect()
}

/// Every process, lowest pid first.
fn pids() -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir(PROC)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The pod UID in one line of `/proc/<pid>/cgroup`, if the path has a pod's cgroup.
fn pod_uid(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let (_, uid) = segment.rsplit_once("pod")?;
        let uid = uid.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hexadecimal.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Local addresses of every network namespace but the agent's own, each with the lowest
/// pid in its namespace, or `None` if several namespaces hold it.
fn address_holders(pids: &[u32]) -> HashMap<IpAddr, Option<u32>> {
    let own = fs::read_link(format!("{PROC}/self/ns/net")).ok();
    let mut seen = HashSet::new();
    let mut holders = HashMap::new();
    for &pid in pids {
        let Ok(netns) = fs::read_link(format!("{PROC}/{pid}/ns/net")) else {
            continue;
        };
        if Some(&netns) == own.as_ref() || !seen.insert(netns) {
            continue;
        }
        let net = format!("{PROC}/{pid}/net");
        let v4 = fs::read_to_string(format!("{net}/fib_trie")).unwrap_or_default();
        let v6 = fs::read_to_string(format!("{net}/if_inet6")).unwrap_or_default();
        for ip in local_addresses(&v4, &v6) {
            holders
                .entry(ip)
                .and_modify(|holder| *holder = None)
                .or_insert(Some(pid));
        }
    }
    holders
}

/// The namespace's own addresses, each once: `fib_trie` lists an address in both the
/// Main and the Local table, which must not count as two holders.
fn local_addresses(fib_trie: &str, if_inet6: &str) -> HashSet<IpAddr> {
    local_ipv4(fib_trie).chain(local_ipv6(if_inet6)).collect()
}

/// Host addresses in `/proc/<pid>/net/fib_trie`: an address line (`|-- 10.0.1.2`)
/// followed by `/32 host LOCAL`.
fn local_ipv4(fib_trie: &str) -> impl Iterator<Item = IpAddr> + '_ {
    let lines: Vec<&str> = fib_trie.lines().map(str::trim).collect();
    let local = lines
        .windows(2)
        .filter(|pair| pair[1].starts_with("/32 host LOCAL"))
        .filter_map(|pair| pair[0].strip_prefix("|-- ")?.parse::<Ipv4Addr>().ok())
        .map(IpAddr::V4)
        .collect::<Vec<_>>();
    local.into_iter()
}

/// Addresses in `/proc/<pid>/net/if_inet6` (32 hexadecimal digits first on each line).
fn local_ipv6(if_inet6: &str) -> impl Iterator<Item = IpAddr> + '_ {
    if_inet6.lines().filter_map(|line| {
        let hex = line.split_whitespace().next()?;
        let bits = u128::from_str_radix(hex, 16).ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(bits)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn finds_pod_uids_in_systemd_and_cgroupfs_paths() {
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/\
            kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/\
            cri-containerd-abc.scope";
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/0123abcd");
        let guaranteed =
            "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        for line in [systemd, &cgroupfs, guaranteed] {
            assert_eq!(pod_uid(line).as_deref(), Some(UID), "{line}");
        }
        for line in [
            "0::/user.slice/user-0.slice/session-1.scope",
            "0::/",
            "garbage",
        ] {
            assert_eq!(pod_uid(line), None, "{line}");
        }
    }

    #[test]
    fn reads_local_addresses_of_a_namespace() {
        let fib_trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.1.2\n        /32 host LOCAL\n\
                        \x20    |-- 10.0.1.255\n        /32 link BROADCAST\n";
        let v4: Vec<_> = local_ipv4(fib_trie).collect();
        assert_eq!(v4, [IpAddr::from([10, 0, 1, 2])]);
        let if_inet6 = "fd000000000000000000000000000102 02 40 00 80 eth0\n";
        let v6: Vec<_> = local_ipv6(if_inet6).collect();
        assert_eq!(v6, ["fd00::102".parse::<IpAddr>().unwrap()]);
        // As Linux prints it: the address under both tables.
        let both = format!("{fib_trie}{}", fib_trie.replace("Main:", "Local:"));
        let all = local_addresses(&both, if_inet6);
        let expected = [IpAddr::from([10, 0, 1, 2]), "fd00::102".parse().unwrap()];
        assert_eq!(all, HashSet::from(expected));
    }
}
