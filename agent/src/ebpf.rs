//! Loading, attaching, pinning and enrolling: everything the agent does to
//! the kernel side of the data path.
//!
//! Everything is pinned under `<bpffs>/nodemesh/<node>/` (`maps/`, `links/`):
//! a crashed or stopped agent leaves the programs in place, so enrolled
//! workloads stay captured and fail closed instead of bypassing the mesh. A
//! starting agent reuses the pinned maps, attaches its programs, then detaches
//! the previous ones (both briefly run; the programs tolerate that).
//! Only the node's owner (`lifecycle::ownership`) loads any of it.
//! `nodemesh uninstall` removes it all.

use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, Program, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use nodemesh_common::{AddrKey, DeliveryKey, Enrollment, OrigDstKey, SockAddr, AF_INET, AF_INET6};
use serde::Serialize;

use crate::netns::NetNs;

/// The object built from `agent-ebpf` by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh"));

/// Cgroup programs attached at the cgroup2 root.
const CGROUP_PROGRAMS: &[&str] = &[
    "nm_connect4",
    "nm_connect6",
    "nm_sendmsg4",
    "nm_sendmsg6",
    "nm_recvmsg4",
    "nm_recvmsg6",
    "nm_sockops",
];
/// Cgroup bpf_links always coexist with other programs (multi-attach) and
/// the kernel rejects any mode flag on them, so "Single" (no flag) it is.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
const SK_LOOKUP: &str = "nm_sk_lookup";
const MAPS: &[&str] = &["ENROLLED", "INBOUND_ADDRS", "INBOUND_SOCKS", "COOKIE_ORIG"];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF link {path}: {reason}")]
    Link { path: String, reason: String },
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Io { what, source }
}

/// Where this node's pins live.
pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    bpffs.join("nodemesh").join(node)
}

/// The loaded programs and the maps the enroller updates.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PathBuf,
    cgroup: PathBuf,
    enrolled: BpfHashMap<MapData, u64, Enrollment>,
    inbound_addrs: BpfHashMap<MapData, AddrKey, u32>,
    inbound_socks: SockHash<MapData, AddrKey>,
}

/// Read side of `ORIG_DST`, owned by the proxy: its lock is held for one
/// lookup per accepted connection and never by reconfiguration.
pub struct OrigDstTable(Mutex<BpfHashMap<MapData, OrigDstKey, SockAddr>>);

impl OrigDstTable {
    /// The destination the client asked for, removed from the table.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = OrigDstKey {
            netns_cookie,
            port: client.port(),
            family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(sock_addr_to_std(&orig))
    }

    /// Redirected connections established but not yet accepted.
    pub fn awaiting_accept(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .count()
    }
}

/// Write side of `DELIVERIES`, owned by the proxy: the connections it is
/// opening to applications from their callers' addresses, which `sk_lookup`
/// lets through instead of steering them back to the agent.
pub struct DeliveryTable(Mutex<BpfHashMap<MapData, DeliveryKey, u8>>);

impl DeliveryTable {
    /// Announces a connection from `from` (the caller's address, bound by
    /// the agent) to `to` (the application) until the returned guard drops:
    /// keep it until the connection is established.
    pub fn announce(&self, from: SocketAddr, to: SocketAddr) -> io::Result<Announced<'_>> {
        let key = DeliveryKey {
            remote: raw_words(&from.ip()),
            local: raw_words(&to.ip()),
            remote_port: from.port(),
            local_port: to.port(),
            family: if from.is_ipv4() { AF_INET } else { AF_INET6 }.into(),
        };
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, 1, 0)
            .map_err(|e| io::Error::other(format!("announcing the delivery to sk_lookup: {e}")))?;
        Ok(Announced { table: self, key })
    }
}

/// A delivery `sk_lookup` lets through; removed on drop.
pub struct Announced<'a> {
    table: &'a DeliveryTable,
    key: DeliveryKey,
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&self.key);
    }
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attach: String,
}

#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: usize,
}

#[derive(Debug, Serialize)]
pub struct EbpfStatus {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
}

impl Datapath {
    /// Loads the programs, reusing this node's pinned maps, and attaches them.
    pub fn load(
        bpffs: &Path,
        node: &str,
    ) -> Result<(Datapath, OrigDstTable, DeliveryTable), EbpfError> {
        ensure_bpffs(bpffs)?;
        let pins = pin_dir(bpffs, node);
        for dir in ["maps", "links"] {
            fs::create_dir_all(pins.join(dir))
                .map_err(io_err(format!("creating {}", pins.display())))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.join("maps"))
            .load(PROGRAMS)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => drop(tokio::spawn(forward_logs(logger))),
            Err(e) => log::warn!("eBPF logs unavailable: {e}"),
        }
        let cgroup = cgroup2_root()?;
        let cgroup_dir =
            fs::File::open(&cgroup).map_err(io_err(format!("opening {}", cgroup.display())))?;
        for &name in CGROUP_PROGRAMS {
            let link = attach_cgroup_program(&mut ebpf, name, &cgroup_dir)?;
            replace_pinned(link, &pins.join("links").join(name))?;
        }
        let sk_lookup: &mut SkLookup = program(&mut ebpf, SK_LOOKUP)?;
        sk_lookup.load().map_err(|source| EbpfError::Program {
            name: SK_LOOKUP,
            source,
        })?;

        let orig_dst = OrigDstTable(Mutex::new(take_map(&mut ebpf, "ORIG_DST")?));
        let deliveries = DeliveryTable(Mutex::new(take_map(&mut ebpf, "DELIVERIES")?));
        let datapath = Datapath {
            enrolled: take_map(&mut ebpf, "ENROLLED")?,
            inbound_addrs: take_map(&mut ebpf, "INBOUND_ADDRS")?,
            inbound_socks: take_map(&mut ebpf, "INBOUND_SOCKS")?,
            ebpf,
            pins,
            cgroup,
        };
        Ok((datapath, orig_dst, deliveries))
    }

    /// Starts capturing a workload: its inbound SYNs go to `inbound_listener`
    /// and its outbound connects to the agent.
    pub fn enroll(
        &mut self,
        netns: &NetNs,
        workload_id: u32,
        addresses: &[IpAddr],
        inbound_listener: &impl AsRawFd,
    ) -> Result<(), EbpfError> {
        let sk_lookup: &mut SkLookup = program(&mut self.ebpf, SK_LOOKUP)?;
        let id = sk_lookup
            .attach(netns)
            .map_err(|source| EbpfError::Program {
                name: SK_LOOKUP,
                source,
            })?;
        let link = sk_lookup
            .take_link(id)
            .map_err(|source| EbpfError::Program {
                name: SK_LOOKUP,
                source,
            })?;
        let link = FdLink::from(link);
        replace_pinned(link, &self.sk_lookup_pin(netns.cookie()))?;
        for key in addresses.iter().filter(|ip| ip.is_ipv4()).map(addr_key) {
            self.inbound_socks
                .insert(key, inbound_listener.as_raw_fd(), 0)
                .map_err(|source| EbpfError::Map {
                    name: "INBOUND_SOCKS",
                    source,
                })?;
            self.inbound_addrs
                .insert(key, 1, 0)
                .map_err(|source| EbpfError::Map {
                    name: "INBOUND_ADDRS",
                    source,
                })?;
        }
        self.enrolled
            .insert(
                netns.cookie(),
                Enrollment {
                    workload_id,
                    flags: 0,
                },
                0,
            )
            .map_err(|source| EbpfError::Map {
                name: "ENROLLED",
                source,
            })
    }

    /// Stops capturing a workload's new connections (open ones carry on).
    pub fn unenroll(&mut self, netns_cookie: u64, addresses: &[IpAddr]) -> Result<(), EbpfError> {
        self.release_addresses(addresses);
        self.release_namespace(netns_cookie)
    }

    /// Stops redirecting a namespace's connects and detaches its sk_lookup.
    pub fn release_namespace(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        let _ = self.enrolled.remove(&netns_cookie);
        unpin_link(&self.sk_lookup_pin(netns_cookie))
    }

    /// Stops capturing connections to these addresses.
    pub fn release_addresses(&mut self, addresses: &[IpAddr]) {
        for key in addresses.iter().map(addr_key) {
            let _ = self.inbound_addrs.remove(&key);
            let _ = self.inbound_socks.remove(&key);
        }
    }

    /// Namespaces enrolled in the pinned map, including by a previous run.
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Addresses captured in the pinned map, including by a previous run.
    pub fn inbound_addresses(&self) -> Vec<IpAddr> {
        self.inbound_addrs
            .keys()
            .filter_map(Result::ok)
            .map(|k| addr_from_key(&k))
            .collect()
    }

    pub fn status(&self) -> EbpfStatus {
        let mut programs: Vec<ProgramStatus> = CGROUP_PROGRAMS
            .iter()
            .map(|name| ProgramStatus {
                name: (*name).into(),
                attach: format!("cgroup {}", self.cgroup.display()),
            })
            .collect();
        programs.push(ProgramStatus {
            name: SK_LOOKUP.into(),
            attach: format!("netns x{}", self.enrolled_cookies().len()),
        });
        let maps = MAPS
            .iter()
            .map(|&name| MapStatus {
                name: name.into(),
                entries: self.map_entries(name),
            })
            .collect();
        EbpfStatus {
            pin_dir: self.pins.clone(),
            cgroup: self.cgroup.clone(),
            programs,
            maps,
        }
    }

    fn map_entries(&self, name: &str) -> usize {
        match name {
            "ENROLLED" => self.enrolled.keys().count(),
            "INBOUND_ADDRS" => self.inbound_addrs.keys().count(),
            "INBOUND_SOCKS" => self.inbound_socks.keys().count(),
            _ => self
                .ebpf
                .map(name)
                .and_then(|map| BpfHashMap::<_, u64, SockAddr>::try_from(map).ok())
                .map_or(0, |map| map.keys().count()),
        }
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pins
            .join("links")
            .join(format!("sk_lookup_{netns_cookie}"))
    }
}

/// Hands the programs' log records to the agent's logger. The logger must be
/// drained continuously, or the programs' log buffer fills up; they only log
/// at debug level, so a periodic drain is enough (and needs no unsafe fd
/// registration).
async fn forward_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        logger.flush();
    }
}

/// Detaches and unpins everything a node's agent left, then removes its pins.
pub fn uninstall(bpffs: &Path, node: &str) -> Result<usize, EbpfError> {
    let pins = pin_dir(bpffs, node);
    let mut removed = 0;
    if let Ok(links) = fs::read_dir(pins.join("links")) {
        for entry in links.flatten() {
            unpin_link(&entry.path())?;
            removed += 1;
        }
    }
    match fs::remove_dir_all(&pins) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", pins.display()))(e)),
    }
    // Leave the shared parent when other nodes still use it.
    let _ = fs::remove_dir(bpffs.join("nodemesh"));
    Ok(removed)
}

fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, EbpfError> {
    let prog_err = |source| EbpfError::Program { name, source };
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => {
            let p: &mut CgroupSockAddr = p;
            p.load().map_err(prog_err)?;
            let id = p.attach(cgroup, LINK_MODE).map_err(prog_err)?;
            FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(|e| link_err(name, e))
        }
        Some(Program::SockOps(p)) => {
            let p: &mut SockOps = p;
            p.load().map_err(prog_err)?;
            let id = p.attach(cgroup, LINK_MODE).map_err(prog_err)?;
            FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(|e| link_err(name, e))
        }
        _ => Err(link_err(name, "missing from the eBPF object")),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| link_err(name, "missing from the eBPF object"))?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| link_err(name, "map missing from the eBPF object"))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn link_err(what: &str, e: impl std::fmt::Display) -> EbpfError {
    EbpfError::Link {
        path: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Pins `link` at `path`; a link pinned there before (by a previous agent) is
/// detached only after the new one is attached, so nothing escapes meanwhile.
fn replace_pinned(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    let previous = PinnedLink::from_pin(path)
        .ok()
        .and_then(|old| old.unpin().ok());
    link.pin(path)
        .map_err(|e| link_err(&path.display().to_string(), e))?;
    drop(previous);
    Ok(())
}

fn unpin_link(path: &Path) -> Result<(), EbpfError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            link.unpin()
                .map_err(io_err(format!("unpinning {}", path.display())))?;
            Ok(())
        }
        Err(_) if !path.exists() => Ok(()),
        Err(e) => Err(link_err(&path.display().to_string(), e)),
    }
}

fn addr_key(ip: &IpAddr) -> AddrKey {
    AddrKey {
        addr: raw_words(ip),
        family: if ip.is_ipv4() { AF_INET } else { AF_INET6 }.into(),
    }
}

/// An address as the kernel hands it to the programs: network byte order,
/// IPv4 in the first word.
fn raw_words(ip: &IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut addr = [0u32; 4];
            for (i, chunk) in o.chunks_exact(4).enumerate() {
                addr[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            addr
        }
    }
}

fn addr_from_key(key: &AddrKey) -> IpAddr {
    raw_ip(&key.addr, key.family as u16)
}

fn raw_ip(addr: &[u32; 4], family: u16) -> IpAddr {
    if family == AF_INET {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(octets)
    }
}

fn sock_addr_to_std(a: &SockAddr) -> SocketAddr {
    SocketAddr::new(raw_ip(&a.addr, a.family), a.port)
}

/// Mounts bpffs at `bpffs` unless it is.
pub fn ensure_bpffs(bpffs: &Path) -> Result<(), EbpfError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(io_err("reading /proc/self/mounts"))?;
    let mounted = mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == bpffs.to_str() && l.split_whitespace().nth(2) == Some("bpf")
    });
    if !mounted {
        fs::create_dir_all(bpffs).map_err(io_err(format!("creating {}", bpffs.display())))?;
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err(format!("mounting bpffs at {}", bpffs.display()))(e.into()))?;
    }
    Ok(())
}

/// The cgroup2 mount (not always /sys/fs/cgroup: hybrid hosts use .../unified).
fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    mounts
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .ok_or(EbpfError::NoCgroup2)
}
