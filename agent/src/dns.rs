//! Mesh DNS responder: answers Service names from mesh state and forwards
//! every other query, byte for byte, to the node's upstream resolver.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the mesh knows about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Addresses(Vec<IpAddr>),
    /// Name is a mesh name (e.g. ends with the cluster domain) but unknown.
    NxDomain,
    /// Not ours: forward upstream.
    Forward,
}

pub trait Resolver: Send + Sync + 'static {
    /// `name` is lowercase, without trailing dot.
    fn lookup(&self, name: &str) -> Lookup;
}

#[derive(thiserror::Error, Debug)]
pub enum DnsError {
    #[error("malformed DNS packet: {0}")]
    Malformed(&'static str),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Queries the node's responders handled, by outcome (the agent exports
/// them as `nodemesh_dns_queries_total`).
#[derive(Debug, Default)]
pub struct DnsCounts {
    /// Mesh names answered here.
    answered: AtomicU64,
    /// Unknown mesh names (NXDOMAIN).
    nxdomain: AtomicU64,
    /// Other replies made here (refused opcodes, classes, formats).
    error: AtomicU64,
    /// Relayed to the upstream resolver.
    forwarded: AtomicU64,
    /// SERVFAIL: the upstream failed, or a limit refused the forward.
    servfail: AtomicU64,
    /// Packets dropped as malformed.
    malformed: AtomicU64,
}

impl DnsCounts {
    /// `(outcome, queries)` for each outcome.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("answered", n(&self.answered)),
            ("nxdomain", n(&self.nxdomain)),
            ("error", n(&self.error)),
            ("forwarded", n(&self.forwarded)),
            ("servfail", n(&self.servfail)),
            ("malformed", n(&self.malformed)),
        ]
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a reply made here by its response code.
    fn local(&self, reply: &[u8]) {
        let rcode = be16(reply, 2).map_or(SERVFAIL, |flags| flags & 0xF);
        Self::count(match rcode {
            NOERROR => &self.answered,
            NXDOMAIN => &self.nxdomain,
            _ => &self.error,
        });
    }
}

/// What [`answer`] decides: a reply made here, or the query goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Local(Vec<u8>),
    Forward,
}

#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

const HEADER_LEN: usize = 12;
const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;
/// Local replies ignore EDNS, so they must fit the classic UDP limit.
const MAX_UDP_REPLY: usize = 512;
/// Largest UDP payload; forwarded replies may use the client's EDNS size.
const MAX_DATAGRAM: usize = 65535;
/// Endpoints come and go with pods; a short TTL bounds how long clients keep
/// using an address the mesh no longer has, at the cost of more (cheap,
/// node-local) queries.
const TTL_SECS: u32 = 5;
/// Forwarded queries in flight per socket; beyond this we answer SERVFAIL
/// at once instead of queueing without bound.
const MAX_IN_FLIGHT: usize = 256;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;

const NOERROR: u16 = 0;
const FORMERR: u16 = 1;
const SERVFAIL: u16 = 2;
const NXDOMAIN: u16 = 3;
const NOTIMP: u16 = 4;

fn be16(packet: &[u8], at: usize) -> Option<u16> {
    packet
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

struct Header {
    id: u16,
    flags: u16,
    qdcount: u16,
}

impl Header {
    fn parse(packet: &[u8]) -> Result<Self, DnsError> {
        if packet.len() < HEADER_LEN {
            return Err(DnsError::Malformed("shorter than a header"));
        }
        let word = |at| be16(packet, at).unwrap_or_default();
        let header = Self {
            id: word(0),
            flags: word(2),
            qdcount: word(4),
        };
        // Answering a response could start a reply loop with another responder.
        if header.flags & QR != 0 {
            return Err(DnsError::Malformed("not a query"));
        }
        Ok(header)
    }

    fn opcode(&self) -> u16 {
        (self.flags >> 11) & 0xF
    }

    /// Builds a reply carrying as many of `answers` as fit in 512 bytes.
    fn reply(&self, question: Option<&Question>, rcode: u16, answers: &[IpAddr]) -> Vec<u8> {
        let mut flags = QR | RA | (self.flags & RD) | rcode;
        // We speak for the mesh names we resolve, not for errors.
        if matches!(rcode, NOERROR | NXDOMAIN) {
            flags |= AA;
        }
        let mut out = vec![0; HEADER_LEN];
        if let Some(question) = question {
            out.extend_from_slice(question.wire);
        }
        let mut ancount = 0u16;
        for ip in answers {
            let (rtype, rdata) = match ip {
                IpAddr::V4(ip) => (TYPE_A, ip.octets().to_vec()),
                IpAddr::V6(ip) => (TYPE_AAAA, ip.octets().to_vec()),
            };
            if out.len() + 12 + rdata.len() > MAX_UDP_REPLY {
                flags |= TC;
                break;
            }
            out.extend_from_slice(&[0xC0, 0x0C]); // pointer to the question name
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&TTL_SECS.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(&rdata);
            ancount += 1;
        }
        let header = [self.id, flags, question.is_some().into(), ancount, 0, 0];
        for (slot, word) in out.chunks_exact_mut(2).zip(header) {
            slot.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

struct Question<'a> {
    /// Echoed verbatim so the client's letter case survives (0x20 randomisation).
    wire: &'a [u8],
    /// None when a label holds bytes that a dotted lowercase name cannot
    /// carry faithfully (dots, non-ASCII): such names are never ours.
    name: Option<String>,
    qtype: u16,
    qclass: u16,
}

impl<'a> Question<'a> {
    fn parse(packet: &'a [u8]) -> Result<Self, &'static str> {
        let mut pos = HEADER_LEN;
        let mut name = Some(String::new());
        loop {
            let len = usize::from(*packet.get(pos).ok_or("name runs past the packet")?);
            pos += 1;
            match len {
                0 => break,
                1..=MAX_LABEL => {}
                0xC0.. => return Err("compression pointer in question"),
                _ => return Err("reserved label type"),
            }
            let label = packet
                .get(pos..pos + len)
                .ok_or("label runs past the packet")?;
            pos += len;
            if label.iter().all(|b| b.is_ascii_graphic() && *b != b'.') {
                if let Some(name) = &mut name {
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
                }
            } else {
                name = None;
            }
        }
        if pos - HEADER_LEN > MAX_NAME {
            return Err("name longer than 255 bytes");
        }
        let (Some(qtype), Some(qclass)) = (be16(packet, pos), be16(packet, pos + 2)) else {
            return Err("question truncated");
        };
        Ok(Self {
            wire: &packet[HEADER_LEN..pos + 4],
            name,
            qtype,
            qclass,
        })
    }
}

enum Outcome {
    Local(Vec<u8>),
    /// Carries the SERVFAIL to send if forwarding fails.
    Forward {
        servfail: Vec<u8>,
    },
}

fn decide(query: &[u8], resolver: &dyn Resolver) -> Result<Outcome, DnsError> {
    let header = Header::parse(query)?;
    if header.opcode() != 0 {
        debug!("opcode {}: NOTIMP", header.opcode());
        return Ok(Outcome::Local(header.reply(None, NOTIMP, &[])));
    }
    let question = match header.qdcount {
        1 => Question::parse(query),
        _ => Err("QDCOUNT is not 1"),
    };
    let question = match question {
        Ok(question) => question,
        Err(why) => {
            debug!("query {:#06x}: FORMERR ({why})", header.id);
            return Ok(Outcome::Local(header.reply(None, FORMERR, &[])));
        }
    };
    let qtype = question.qtype;
    let lookup = match &question.name {
        Some(name) if question.qclass == CLASS_IN => resolver.lookup(name),
        _ => Lookup::Forward,
    };
    let name = question.name.as_deref().unwrap_or("<binary>");
    let (rcode, answers) = match lookup {
        Lookup::Forward => {
            debug!("{name} type {qtype}: forwarded");
            let servfail = header.reply(Some(&question), SERVFAIL, &[]);
            return Ok(Outcome::Forward { servfail });
        }
        Lookup::NxDomain => (NXDOMAIN, Vec::new()),
        Lookup::Addresses(all) => {
            let wanted = |ip: &IpAddr| match qtype {
                TYPE_A => ip.is_ipv4(),
                TYPE_AAAA => ip.is_ipv6(),
                _ => false,
            };
            (NOERROR, all.into_iter().filter(wanted).collect::<Vec<_>>())
        }
    };
    debug!(
        "{name} type {qtype}: rcode {rcode}, {} answers",
        answers.len()
    );
    Ok(Outcome::Local(header.reply(
        Some(&question),
        rcode,
        &answers,
    )))
}

/// Builds the reply to one query packet, or says it must be forwarded.
///
/// `Err` means the packet deserves no reply at all (too short for a header,
/// or not a query). The responder itself goes through `decide`, which keeps
/// the SERVFAIL to send if forwarding fails; this is its plain view, for the
/// tests and the fuzz target.
pub fn answer(query: &[u8], resolver: &dyn Resolver) -> Result<Reply, DnsError> {
    Ok(match decide(query, resolver)? {
        Outcome::Local(reply) => Reply::Local(reply),
        Outcome::Forward { .. } => Reply::Forward,
    })
}

/// Serves DNS on `socket` until it errors fatally; forwards to `upstream` with the given timeout.
/// A forwarded query opens a socket of its own: `descriptor` charges it to
/// whoever asked (held until the exchange ends), or refuses it (SERVFAIL).
pub async fn serve<Fd: Send + 'static>(
    socket: UdpSocket,
    resolver: Arc<dyn Resolver>,
    upstream: Upstream,
    descriptor: impl Fn() -> Option<Fd>,
    counts: Arc<DnsCounts>,
) -> io::Result<()> {
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        let (len, client) = socket.recv_from(&mut buf).await?;
        let query = &buf[..len];
        let reply = match decide(query, &*resolver) {
            Ok(Outcome::Local(reply)) => {
                counts.local(&reply);
                reply
            }
            Ok(Outcome::Forward { servfail }) => match in_flight.clone().try_acquire_owned() {
                Ok(permit) => match descriptor() {
                    Some(fd) => {
                        DnsCounts::count(&counts.forwarded);
                        let exchange = Exchange {
                            socket: socket.clone(),
                            client,
                            query: query.to_vec(),
                            servfail,
                            counts: counts.clone(),
                        };
                        tokio::spawn(exchange.run(upstream, (permit, fd)));
                        continue;
                    }
                    None => {
                        debug!("no descriptor to forward a query: SERVFAIL to {client}");
                        DnsCounts::count(&counts.servfail);
                        servfail
                    }
                },
                Err(_) => {
                    warn!("{MAX_IN_FLIGHT} forwarded queries in flight: SERVFAIL to {client}");
                    DnsCounts::count(&counts.servfail);
                    servfail
                }
            },
            Err(e) => {
                debug!("dropping packet from {client}: {e}");
                DnsCounts::count(&counts.malformed);
                continue;
            }
        };
        send(&socket, &reply, client).await;
    }
}

/// One forwarded query, owned by its task.
struct Exchange {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    query: Vec<u8>,
    servfail: Vec<u8>,
    counts: Arc<DnsCounts>,
}

impl Exchange {
    async fn run<Fd>(self, upstream: Upstream, _held: (OwnedSemaphorePermit, Fd)) {
        let reply = match forward(&self.query, upstream).await {
            Ok(reply) => reply,
            Err(e) => {
                debug!(
                    "upstream {}: {e}; SERVFAIL to {}",
                    upstream.addr, self.client
                );
                DnsCounts::count(&self.counts.servfail);
                self.servfail
            }
        };
        send(&self.socket, &reply, self.client).await;
    }
}

/// A client that went away must not stop serving the others, so send errors
/// are only logged.
async fn send(socket: &UdpSocket, reply: &[u8], client: SocketAddr) {
    if let Err(e) = socket.send_to(reply, client).await {
        debug!("reply to {client}: {e}");
    }
}

/// Relays `query` (whose header is known valid) over a fresh connected socket:
/// the kernel then only delivers the upstream's datagrams, and each query gets
/// its own random source port.
async fn forward(query: &[u8], upstream: Upstream) -> Result<Vec<u8>, DnsError> {
    let local: SocketAddr = match upstream.addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream.addr).await?;
    let exchange = async {
        socket.send(query).await?;
        let mut buf = vec![0; MAX_DATAGRAM];
        loop {
            let len = socket.recv(&mut buf).await?;
            // A wrong ID is stale or spoofed: keep waiting for the real answer.
            if buf[..len].starts_with(&query[..2]) {
                buf.truncate(len);
                return Ok::<_, io::Error>(buf);
            }
        }
    };
    let timed = tokio::time::timeout(upstream.timeout, exchange).await;
    Ok(timed.map_err(|_| DnsError::UpstreamTimeout(upstream.timeout))??)
}

/// First `nameserver` of a resolv.conf, for the default upstream; None if there is none.
///
/// Entries that are not plain addresses (e.g. scoped `fe80::1%eth0`) are
/// skipped, like the C library does for what it cannot parse.
pub fn upstream_from_resolv_conf(text: &str) -> Option<IpAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(addr)) => addr.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const WEB: &str = "web.default.svc.cluster.local";
    const V4ONLY: &str = "v4only.default.svc.cluster.local";
    const BIG: &str = "big.default.svc.cluster.local";
    const WEB_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const WEB_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    const TYPE_TXT: u16 = 16;

    struct Mesh;

    impl Resolver for Mesh {
        fn lookup(&self, name: &str) -> Lookup {
            match name {
                WEB => Lookup::Addresses(vec![WEB_V4, WEB_V6]),
                V4ONLY => Lookup::Addresses(vec![WEB_V4]),
                BIG => Lookup::Addresses(
                    (0..=255)
                        .map(|i| Ipv4Addr::new(10, 1, 0, i).into())
                        .collect(),
                ),
                _ if name.ends_with(".cluster.local") => Lookup::NxDomain,
                _ => Lookup::Forward,
            }
        }
    }

    fn query_with(id: u16, flags: u16, name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
        let mut q = [id, flags, 1, 0, 0, 0]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect::<Vec<_>>();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&qclass.to_be_bytes());
        q
    }

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        query_with(id, RD, name, qtype, CLASS_IN)
    }

    #[derive(Debug)]
    struct Parsed {
        id: u16,
        flags: u16,
        question: Option<Vec<u8>>,
        answers: Vec<IpAddr>,
    }

    impl Parsed {
        fn rcode(&self) -> u16 {
            self.flags & 0xF
        }
    }

    /// Parses a reply as `Header::reply` lays it out, checking every fixed field.
    fn parse(reply: &[u8]) -> Parsed {
        let word = |at| be16(reply, at).unwrap();
        let (qdcount, ancount) = (word(4), word(6));
        assert_eq!((word(8), word(10)), (0, 0), "NSCOUNT/ARCOUNT");
        let question = (qdcount == 1).then(|| Question::parse(reply).unwrap().wire.to_vec());
        let mut pos = HEADER_LEN + question.as_ref().map_or(0, Vec::len);
        let answers = (0..ancount)
            .map(|_| {
                let rtype = word(pos + 2);
                let rdlen = usize::from(word(pos + 10));
                assert_eq!(word(pos), 0xC00C, "name pointer");
                assert_eq!(word(pos + 4), CLASS_IN);
                assert_eq!(reply[pos + 6..pos + 10], TTL_SECS.to_be_bytes());
                let rdata = &reply[pos + 12..pos + 12 + rdlen];
                pos += 12 + rdlen;
                match (rtype, rdata.len()) {
                    (TYPE_A, 4) => IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap()),
                    (TYPE_AAAA, 16) => IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap()),
                    other => panic!("bad record {other:?}"),
                }
            })
            .collect();
        assert_eq!(pos, reply.len(), "trailing bytes");
        Parsed {
            id: word(0),
            flags: word(2),
            question,
            answers,
        }
    }

    fn local(query: &[u8]) -> Parsed {
        match answer(query, &Mesh).unwrap() {
            Reply::Local(reply) => parse(&reply),
            Reply::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn answers_a_and_aaaa_by_family() {
        for (qtype, ip) in [(TYPE_A, WEB_V4), (TYPE_AAAA, WEB_V6)] {
            let q = query(0x1234, WEB, qtype);
            let r = local(&q);
            assert_eq!(r.id, 0x1234);
            assert_eq!(r.flags, QR | AA | RD | RA);
            assert_eq!(r.question.as_deref(), Some(&q[HEADER_LEN..]));
            assert_eq!(r.answers, [ip]);
        }
    }

    #[test]
    fn known_name_without_matching_records_is_nodata() {
        for (name, qtype) in [(V4ONLY, TYPE_AAAA), (WEB, TYPE_TXT)] {
            let r = local(&query(7, name, qtype));
            assert_eq!((r.rcode(), r.flags & AA), (NOERROR, AA));
            assert!(r.answers.is_empty());
        }
    }

    #[test]
    fn unknown_mesh_name_is_nxdomain() {
        let r = local(&query(7, "nope.default.svc.cluster.local", TYPE_A));
        assert_eq!((r.rcode(), r.flags & AA), (NXDOMAIN, AA));
        assert!(r.question.is_some() && r.answers.is_empty());
    }

    #[test]
    fn foreign_names_and_classes_are_forwarded() {
        let chaos = query_with(1, RD, WEB, TYPE_A, 3);
        let dotted_label = {
            let mut q = query(1, "x.cluster.local", TYPE_A);
            q[HEADER_LEN + 1] = b'.';
            q
        };
        for q in [query(1, "example.com", TYPE_A), chaos, dotted_label] {
            assert_eq!(answer(&q, &Mesh).unwrap(), Reply::Forward);
        }
    }

    #[test]
    fn name_matching_ignores_case_but_echoes_it() {
        let q = query(9, "WeB.Default.SVC.cluster.local.", TYPE_A);
        let r = local(&q);
        assert_eq!(r.answers, [WEB_V4]);
        assert_eq!(r.question.as_deref(), Some(&q[HEADER_LEN..]));
    }

    #[test]
    fn echoes_id_and_rd() {
        let r = local(&query_with(0xBEEF, 0, WEB, TYPE_A, CLASS_IN));
        assert_eq!((r.id, r.flags), (0xBEEF, QR | AA | RA));
    }

    #[test]
    fn ignores_edns_and_replies_without_opt() {
        let mut q = query(3, WEB, TYPE_A);
        q[11] = 1; // ARCOUNT
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(local(&q).answers, [WEB_V4]);
    }

    #[test]
    fn truncates_to_512_bytes() {
        let Reply::Local(reply) = answer(&query(1, BIG, TYPE_A), &Mesh).unwrap() else {
            panic!("forwarded");
        };
        assert!(reply.len() <= MAX_UDP_REPLY);
        let r = parse(&reply);
        assert_eq!(r.flags & TC, TC);
        let question_len = r.question.unwrap().len();
        assert_eq!(
            r.answers.len(),
            (MAX_UDP_REPLY - HEADER_LEN - question_len) / 16
        );
    }

    #[test]
    fn bad_questions_get_formerr() {
        let two_questions = {
            let mut q = query(5, WEB, TYPE_A);
            q[5] = 2;
            q
        };
        let pointer = {
            let mut q = query(5, "", TYPE_A);
            q.splice(HEADER_LEN..=HEADER_LEN, [0xC0, 0x0C]);
            q
        };
        let truncated_label = query(5, WEB, TYPE_A)[..20].to_vec();
        let no_type = query(5, WEB, TYPE_A)[..HEADER_LEN + WEB.len() + 2].to_vec();
        let too_long = query(5, &[&*"a".repeat(63); 4].join("."), TYPE_A);
        let reserved_label = {
            let mut q = query(5, WEB, TYPE_A);
            q[HEADER_LEN] = 0x40;
            q
        };
        for q in [
            two_questions,
            pointer,
            truncated_label,
            no_type,
            too_long,
            reserved_label,
        ] {
            let r = local(&q);
            assert_eq!((r.id, r.rcode(), r.flags & AA), (5, FORMERR, 0), "{q:?}");
            assert!(r.question.is_none());
        }
    }

    #[test]
    fn longest_legal_name_is_accepted() {
        let name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(
            answer(&query(1, &name, TYPE_A), &Mesh).unwrap(),
            Reply::Forward
        );
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let r = local(&query_with(8, 5 << 11, WEB, TYPE_A, CLASS_IN));
        assert_eq!((r.id, r.rcode()), (8, NOTIMP));
    }

    #[test]
    fn drops_what_cannot_be_answered() {
        let mut response = query(1, WEB, TYPE_A);
        response[2] |= 0x80;
        for packet in [&[0x12, 0x34, 0x01][..], &[], &response] {
            assert!(matches!(answer(packet, &Mesh), Err(DnsError::Malformed(_))));
        }
    }

    #[test]
    fn resolv_conf_first_nameserver() {
        let text = "# nameserver 192.0.2.1\n; nameserver 192.0.2.2\noptions ndots:5\n\
                    search svc.cluster.local\nnameserver fe80::1%eth0\n  nameserver\t2001:db8::53\n\
                    nameserver 192.0.2.3\n";
        assert_eq!(upstream_from_resolv_conf(text), "2001:db8::53".parse().ok());
        assert_eq!(
            upstream_from_resolv_conf("nameserver 10.96.0.10 # dns\n"),
            "10.96.0.10".parse().ok()
        );
        assert_eq!(upstream_from_resolv_conf("options ndots:5\n"), None);
    }

    const CANNED: &[u8] = &[0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, b'u', b'p'];

    /// An upstream that first sends a reply with the wrong ID, then the canned one.
    async fn canned_upstream() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0; 512];
            loop {
                let (_, from) = socket.recv_from(&mut buf).await.unwrap();
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                for id in [!id, id] {
                    let reply = [&id.to_be_bytes()[..], CANNED].concat();
                    socket.send_to(&reply, from).await.unwrap();
                }
            }
        });
        addr
    }

    async fn start(upstream: SocketAddr, timeout: Duration) -> (UdpSocket, SocketAddr) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let upstream = Upstream {
            addr: upstream,
            timeout,
        };
        let counts = Arc::new(DnsCounts::default());
        tokio::spawn(serve(server, Arc::new(Mesh), upstream, || Some(()), counts));
        (UdpSocket::bind("127.0.0.1:0").await.unwrap(), server_addr)
    }

    async fn recv(client: &UdpSocket) -> Vec<u8> {
        let mut buf = vec![0; MAX_DATAGRAM];
        let recv = client.recv(&mut buf);
        let len = tokio::time::timeout(Duration::from_secs(10), recv)
            .await
            .unwrap()
            .unwrap();
        buf.truncate(len);
        buf
    }

    #[tokio::test]
    async fn serves_local_names_and_relays_upstream_replies() {
        let (client, server) = start(canned_upstream().await, Duration::from_secs(5)).await;
        client.connect(server).await.unwrap();

        client.send(&query(1, WEB, TYPE_A)).await.unwrap();
        assert_eq!(parse(&recv(&client).await).answers, [WEB_V4]);

        client
            .send(&query(0xABCD, "example.com", TYPE_A))
            .await
            .unwrap();
        assert_eq!(recv(&client).await, [&[0xAB, 0xCD][..], CANNED].concat());
    }

    #[tokio::test]
    async fn a_workload_without_descriptors_gets_servfail_for_forwarded_names_only() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let upstream = Upstream {
            addr: canned_upstream().await,
            timeout: Duration::from_secs(5),
        };
        let counts = Arc::new(DnsCounts::default());
        let serving = serve(
            server,
            Arc::new(Mesh),
            upstream,
            || None::<()>,
            counts.clone(),
        );
        tokio::spawn(serving);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server_addr).await.unwrap();

        client.send(&query(4, "example.com", TYPE_A)).await.unwrap();
        let refused = parse(&recv(&client).await);
        assert_eq!((refused.id, refused.rcode()), (4, SERVFAIL));
        client.send(&query(5, WEB, TYPE_A)).await.unwrap();
        assert_eq!(parse(&recv(&client).await).answers, [WEB_V4]);
        client
            .send(&query(6, "nope.default.svc.cluster.local", TYPE_A))
            .await
            .unwrap();
        assert_eq!(parse(&recv(&client).await).rcode(), NXDOMAIN);
        client.send(&[0; 3]).await.unwrap();
        client.send(&query(7, WEB, TYPE_A)).await.unwrap();
        recv(&client).await;
        let by_outcome = counts.snapshot();
        let count = |outcome| by_outcome.iter().find(|(o, _)| *o == outcome).unwrap().1;
        assert_eq!(
            ["answered", "nxdomain", "forwarded", "servfail", "malformed"].map(count),
            [2, 1, 0, 1, 1]
        );
    }

    #[tokio::test]
    async fn silent_upstream_gives_servfail_after_timeout_without_blocking() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let timeout = Duration::from_millis(300);
        let (client, server) = start(silent.local_addr().unwrap(), timeout).await;
        client.connect(server).await.unwrap();

        let started = Instant::now();
        let foreign = query(2, "example.com", TYPE_A);
        client.send(&foreign).await.unwrap();
        client.send(&query(3, WEB, TYPE_A)).await.unwrap();

        let first = parse(&recv(&client).await);
        assert_eq!((first.id, first.answers.as_slice()), (3, &[WEB_V4][..]));
        let second = parse(&recv(&client).await);
        assert!(started.elapsed() >= timeout);
        assert_eq!(
            (second.id, second.rcode(), second.flags & RD),
            (2, SERVFAIL, RD)
        );
        assert_eq!(second.question.as_deref(), Some(&foreign[HEADER_LEN..]));
    }

    #[tokio::test]
    async fn refused_upstream_gives_servfail() {
        let closed = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (client, server) = start(closed, Duration::from_secs(5)).await;
        client
            .send_to(&query(4, "example.com", TYPE_A), server)
            .await
            .unwrap();
        let r = parse(&recv(&client).await);
        assert_eq!((r.id, r.rcode()), (4, SERVFAIL));
    }

    #[tokio::test]
    async fn excess_forwards_get_immediate_servfail() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (client, server) = start(silent.local_addr().unwrap(), Duration::from_secs(30)).await;
        for id in 0..=MAX_IN_FLIGHT as u16 {
            client
                .send_to(&query(id, "example.com", TYPE_A), server)
                .await
                .unwrap();
            // Let the server drain its socket so no query is dropped.
            tokio::task::yield_now().await;
        }
        let r = parse(&recv(&client).await);
        assert_eq!((r.id, r.rcode()), (MAX_IN_FLIGHT as u16, SERVFAIL));
    }
}
