//! Trace context propagation as Istio's proxies do it: W3C Trace Context
//! (`traceparent`, `tracestate`) and B3 (`x-b3-*` headers or the single
//! `b3` header) are read; W3C and B3 multi-headers are written, so callers
//! and applications that know either keep one trace; `x-request-id` is kept
//! or, when absent, set to a new UUIDv4.
//!
//! Parsing never allocates: a request that is not sampled and already
//! carries a context is passed on untouched.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The span a request arrived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// What a request's headers say about its trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incoming {
    /// `None`: no valid context; a new trace starts here.
    pub parent: Option<Parent>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
}

/// The context a request leaves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The parent of `span_id` (B3 names it; W3C does not carry it).
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
}

/// Reads the context: a valid `traceparent` first, then `b3`, then the
/// `x-b3-*` headers. An invalid header counts as absent.
pub fn extract(headers: &HeaderMap) -> Incoming {
    if let Some(found) = header(headers, &TRACEPARENT).and_then(parse_traceparent) {
        return found;
    }
    if let Some(found) = header(headers, &B3).and_then(parse_b3_single) {
        return found;
    }
    parse_b3_multi(headers)
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    headers.get(name).map(HeaderValue::as_bytes)
}

/// `version-traceid-spanid-flags`, lower-case hex (W3C Trace Context 1).
fn parse_traceparent(value: &[u8]) -> Option<Incoming> {
    let value = value.trim_ascii();
    let version = hex_array::<1>(value.get(0..2)?)?[0];
    // Version ff is invalid; 00 has exactly four fields, a later version
    // may append more after a dash.
    let fits = match version {
        0xff => false,
        0 => value.len() == 55,
        _ => value.len() == 55 || value.get(55) == Some(&b'-'),
    };
    if !fits || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = hex_array::<16>(&value[3..35]).filter(|id| not_zero(id))?;
    let span_id = hex_array::<8>(&value[36..52]).filter(|id| not_zero(id))?;
    let flags = hex_array::<1>(&value[53..55])?[0];
    Some(Incoming {
        parent: Some(Parent { trace_id, span_id }),
        sampled: Some(flags & 1 == 1),
    })
}

/// `b3: {trace}-{span}[-{sampling}[-{parent}]]`, or only `{sampling}`.
fn parse_b3_single(value: &[u8]) -> Option<Incoming> {
    let mut fields = value.trim_ascii().split(|&b| b == b'-');
    let first = fields.next()?;
    let Some(span) = fields.next() else {
        // Only a sampling decision.
        return Some(Incoming {
            parent: None,
            sampled: Some(b3_sampling(first)?),
        });
    };
    let parent = Parent {
        trace_id: b3_trace_id(first)?,
        span_id: hex_array::<8>(span).filter(|id| not_zero(id))?,
    };
    let sampled = match fields.next() {
        Some(sampling) => Some(b3_sampling(sampling)?),
        None => None,
    };
    Some(Incoming {
        parent: Some(parent),
        sampled,
    })
}

/// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags` (1: debug,
/// which samples). Ids without a valid pair count as none; a decision alone
/// is still honoured.
fn parse_b3_multi(headers: &HeaderMap) -> Incoming {
    let trace_id = header(headers, &B3_TRACE_ID).and_then(b3_trace_id);
    let span_id =
        header(headers, &B3_SPAN_ID).and_then(|v| hex_array::<8>(v).filter(|id| not_zero(id)));
    let debug = header(headers, &B3_FLAGS).is_some_and(|v| v == b"1");
    let sampled = match header(headers, &B3_SAMPLED) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    Incoming {
        parent: trace_id
            .zip(span_id)
            .map(|(trace_id, span_id)| Parent { trace_id, span_id }),
        sampled,
    }
}

/// A B3 trace id: 128 bits, or 64 (left-padded with zeros, as B3 says).
fn b3_trace_id(value: &[u8]) -> Option<TraceId> {
    let id = match value.len() {
        32 => hex_array::<16>(value)?,
        16 => {
            let low = hex_array::<8>(value)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    not_zero(&id).then_some(id)
}

fn b3_sampling(value: &[u8]) -> Option<bool> {
    match value {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

fn not_zero(id: &[u8]) -> bool {
    id.iter().any(|&b| b != 0)
}

/// `N` bytes from exactly `2N` lower-case hex digits.
fn hex_array<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn write_hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a [u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    &out[..2 * bytes.len()]
}

/// The header values one request gets, written into one buffer that they
/// share: one allocation for all of them, and copies of the request's
/// headers (one for every upstream attempt) share them too, where values
/// each made on its own would be copied again by their first clone.
#[derive(Default)]
pub struct Values(BytesMut);

/// Room for a request id and a full context.
const VALUES_CAPACITY: usize = 36 + 55 + 3 * 16 + 32;

impl Values {
    fn value(&mut self, bytes: &[u8]) -> HeaderValue {
        if self.0.capacity() < bytes.len() {
            self.0.reserve(VALUES_CAPACITY.max(bytes.len()));
        }
        self.0.extend_from_slice(bytes);
        HeaderValue::from_maybe_shared(self.0.split().freeze())
            .expect("hex digits, dashes and digits are valid header bytes")
    }
}

/// Writes `ctx` as `traceparent` and B3 multi-headers, replacing any
/// context the request carried (`tracestate` is vendors' and passes on).
pub fn inject(headers: &mut HeaderMap, ctx: &Outgoing, values: &mut Values) {
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    write_hex(&ctx.trace_id, &mut buf[3..35]);
    buf[35] = b'-';
    write_hex(&ctx.span_id, &mut buf[36..52]);
    buf[52..].copy_from_slice(if ctx.sampled { b"-01" } else { b"-00" });
    headers.insert(TRACEPARENT, values.value(&buf));
    headers.remove(B3);
    headers.remove(B3_FLAGS);
    let mut hex = [0u8; 32];
    headers.insert(
        B3_TRACE_ID,
        values.value(write_hex(&ctx.trace_id, &mut hex)),
    );
    headers.insert(B3_SPAN_ID, values.value(write_hex(&ctx.span_id, &mut hex)));
    match ctx.parent_span_id {
        Some(parent) => {
            headers.insert(
                B3_PARENT_SPAN_ID,
                values.value(write_hex(&parent, &mut hex)),
            );
        }
        None => {
            headers.remove(B3_PARENT_SPAN_ID);
        }
    }
    let sampled = HeaderValue::from_static(if ctx.sampled { "1" } else { "0" });
    headers.insert(B3_SAMPLED, sampled);
}

/// Sets `x-request-id` to a new UUIDv4 unless the request has one.
pub fn ensure_request_id(headers: &mut HeaderMap, values: &mut Values) {
    if !headers.contains_key(REQUEST_ID) {
        headers.insert(REQUEST_ID, values.value(&uuid_v4()));
    }
}

/// A random UUID (version 4, RFC 9562 variant), hyphenated.
fn uuid_v4() -> [u8; 36] {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, group) in [4, 2, 2, 2, 6].into_iter().enumerate() {
        let start: usize = [0, 4, 6, 8, 10][i];
        write_hex(&bytes[start..start + group], &mut out[at..at + 2 * group]);
        at += 2 * group + 1;
    }
    out
}

/// A new random trace id (never zero, which is invalid).
pub fn new_trace_id() -> TraceId {
    fastrand::u128(1..).to_be_bytes()
}

/// A new random span id (never zero).
pub fn new_span_id() -> SpanId {
    fastrand::u64(1..).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn hex(bytes: &[u8]) -> String {
        let mut out = vec![0; 2 * bytes.len()];
        write_hex(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn parent() -> Parent {
        Parent {
            trace_id: hex_array(TRACE.as_bytes()).unwrap(),
            span_id: hex_array(SPAN.as_bytes()).unwrap(),
        }
    }

    #[test]
    fn traceparent_gives_ids_and_the_sampled_flag() {
        let sampled = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-01"),
        )]));
        assert_eq!(sampled.parent, Some(parent()));
        assert_eq!(sampled.sampled, Some(true));
        let not = extract(&headers(&[(
            "traceparent",
            &format!("00-{TRACE}-{SPAN}-00"),
        )]));
        assert_eq!(not.sampled, Some(false));
        // A later version may carry more fields.
        let later = extract(&headers(&[(
            "traceparent",
            &format!("cc-{TRACE}-{SPAN}-01-what-comes-next"),
        )]));
        assert_eq!(later.parent, Some(parent()));
    }

    #[test]
    fn invalid_traceparent_means_a_new_trace() {
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{zero_trace}-{SPAN}-01"),
            format!("00-{TRACE}-{zero_span}-01"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00_{TRACE}_{SPAN}_01"),
            "garbage".to_owned(),
        ] {
            let got = extract(&headers(&[("traceparent", &bad)]));
            assert_eq!(got, Incoming::default(), "{bad}");
        }
    }

    #[test]
    fn invalid_traceparent_falls_back_to_b3() {
        let got = extract(&headers(&[
            ("traceparent", "00-nope"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(got.parent, Some(parent()));
        assert_eq!(got.sampled, Some(true));
    }

    #[test]
    fn b3_single_header_forms() {
        let full = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-1-{SPAN}"))]));
        assert_eq!(full.parent, Some(parent()));
        assert_eq!(full.sampled, Some(true));
        let deferred = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}"))]));
        assert_eq!((deferred.parent, deferred.sampled), (Some(parent()), None));
        let debug = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-d"))]));
        assert_eq!(debug.sampled, Some(true));
        let deny = extract(&headers(&[("b3", "0")]));
        assert_eq!(
            deny,
            Incoming {
                parent: None,
                sampled: Some(false)
            }
        );
        // 64-bit trace ids are left-padded.
        let short = extract(&headers(&[("b3", &format!("{}-{SPAN}-0", &TRACE[16..]))]));
        let id = short.parent.unwrap().trace_id;
        assert_eq!(hex(&id), format!("{}{}", "0".repeat(16), &TRACE[16..]));
        assert_eq!(short.sampled, Some(false));
        assert_eq!(extract(&headers(&[("b3", "x-y-z")])), Incoming::default());
    }

    #[test]
    fn b3_multi_headers_and_the_sampled_zero_decision() {
        let got = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!((got.parent, got.sampled), (Some(parent()), Some(false)));
        let debug = extract(&headers(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]));
        assert_eq!(
            debug,
            Incoming {
                parent: None,
                sampled: Some(true)
            }
        );
        // A span id without a trace id is no parent.
        let half = extract(&headers(&[("x-b3-spanid", SPAN)]));
        assert_eq!(half, Incoming::default());
    }

    #[test]
    fn inject_writes_w3c_and_b3_and_replaces_the_old_context() {
        let mut map = headers(&[
            ("b3", "0"),
            ("x-b3-flags", "1"),
            ("tracestate", "vendor=1"),
            ("x-b3-parentspanid", "1111111111111111"),
        ]);
        let ctx = Outgoing {
            trace_id: parent().trace_id,
            span_id: [0xab; 8],
            parent_span_id: None,
            sampled: true,
        };
        inject(&mut map, &ctx, &mut Values::default());
        assert_eq!(
            map["traceparent"],
            format!("00-{TRACE}-abababababababab-01")
        );
        assert_eq!(map["x-b3-traceid"], TRACE);
        assert_eq!(map["x-b3-spanid"], "abababababababab");
        assert_eq!(map["x-b3-sampled"], "1");
        assert!(!map.contains_key("b3") && !map.contains_key("x-b3-flags"));
        assert!(!map.contains_key("x-b3-parentspanid"));
        assert_eq!(map["tracestate"], "vendor=1");
        // What was written reads back as the same context.
        let back = extract(&map);
        assert_eq!(back.parent.unwrap().span_id, [0xab; 8]);
        inject(
            &mut map,
            &Outgoing {
                parent_span_id: Some([1; 8]),
                sampled: false,
                ..ctx
            },
            &mut Values::default(),
        );
        assert_eq!(map["x-b3-parentspanid"], "0101010101010101");
        assert_eq!(extract(&map).sampled, Some(false));
    }

    #[test]
    fn request_id_is_kept_or_a_new_uuid_v4() {
        let mut kept = headers(&[("x-request-id", "mine")]);
        ensure_request_id(&mut kept, &mut Values::default());
        assert_eq!(kept["x-request-id"], "mine");
        let mut new = HeaderMap::new();
        ensure_request_id(&mut new, &mut Values::default());
        let id = new["x-request-id"].to_str().unwrap().to_owned();
        let groups: Vec<&str> = id.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
        assert!(groups[2].starts_with('4'), "{id}");
        assert!("89ab".contains(&groups[3][..1]), "{id}");
        ensure_request_id(&mut new, &mut Values::default());
        assert_eq!(new["x-request-id"], id.as_str());
    }
}
