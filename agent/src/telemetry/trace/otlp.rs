//! OTLP's `ExportTraceServiceRequest` in protobuf, hand-encoded: the few
//! messages and fields a proxy's spans need (opentelemetry-proto
//! `trace/v1`, `resource/v1`, `common/v1`), no code generator and no
//! protobuf runtime in the agent.
//!
//! ```text
//! ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }
//! ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }
//! Resource { repeated KeyValue attributes = 1; }
//! ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }
//! InstrumentationScope { string name = 1; string version = 2; }
//! Span { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3;
//!        bytes parent_span_id = 4; string name = 5; SpanKind kind = 6;
//!        fixed64 start_time_unix_nano = 7; fixed64 end_time_unix_nano = 8;
//!        repeated KeyValue attributes = 9; Status status = 15; }
//! Status { string message = 2; StatusCode code = 3; }
//! KeyValue { string key = 1; AnyValue value = 2; }
//! AnyValue { oneof { string string_value = 1; int64 int_value = 3; } }
//! ```

use std::collections::BTreeMap;

use super::span::{Kind, Span, Value};

/// OTLP's `SpanKind` values.
const SPAN_KIND_SERVER: u64 = 2;
const SPAN_KIND_CLIENT: u64 = 3;
/// OTLP's `StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// The request body for `POST /v1/traces`: one `ResourceSpans` per
/// `service.name`, the agent as instrumentation scope.
pub fn export_request(spans: &[Span]) -> Vec<u8> {
    let mut by_service: BTreeMap<&str, Vec<&Span>> = BTreeMap::new();
    for span in spans {
        by_service.entry(&span.service).or_default().push(span);
    }
    let mut out = Writer::default();
    for (service, spans) in by_service {
        out.message(1, |resource_spans| {
            resource_spans.message(1, |resource| {
                resource.message(1, |kv| {
                    key_value(kv, "service.name", &Value::Str(service.into()))
                });
            });
            resource_spans.message(2, |scope_spans| {
                scope_spans.message(1, |scope| {
                    scope.string(1, "nodemesh");
                    scope.string(2, env!("CARGO_PKG_VERSION"));
                });
                for span in spans {
                    scope_spans.message(2, |s| encode_span(s, span));
                }
            });
        });
    }
    out.0
}

fn encode_span(out: &mut Writer, span: &Span) {
    out.bytes(1, &span.trace_id);
    out.bytes(2, &span.span_id);
    if let Some(state) = &span.trace_state {
        out.string(3, state);
    }
    if let Some(parent) = &span.parent_span_id {
        out.bytes(4, parent);
    }
    out.string(5, &span.name);
    let kind = match span.kind {
        Kind::Server => SPAN_KIND_SERVER,
        Kind::Client => SPAN_KIND_CLIENT,
    };
    out.varint_field(6, kind);
    out.fixed64(7, span.start_unix_nano);
    out.fixed64(8, span.end_unix_nano);
    for (key, value) in &span.attributes {
        out.message(9, |kv| key_value(kv, key, value));
    }
    if span.error {
        out.message(15, |status| status.varint_field(3, STATUS_CODE_ERROR));
    }
}

fn key_value(out: &mut Writer, key: &str, value: &Value) {
    out.string(1, key);
    out.message(2, |any| match value {
        Value::Str(s) => any.string(1, s),
        // int64 is a varint of the two's complement.
        Value::Int(i) => any.varint_field(3, *i as u64),
    });
}

/// A protobuf encoder of the wire types above.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn varint_field(&mut self, field: u32, v: u64) {
        self.key(field, VARINT);
        self.varint(v);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    /// An embedded message, length-prefixed.
    fn message(&mut self, field: u32, encode: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        encode(&mut inner);
        self.bytes(field, &inner.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_negative_ints_encode_as_protobuf() {
        let mut w = Writer::default();
        w.varint(1);
        w.varint(300);
        assert_eq!(w.0, [0x01, 0xac, 0x02]);
        let mut kv = Writer::default();
        key_value(&mut kv, "a", &Value::Int(-1));
        // key "a", then AnyValue { int_value (3) = -1 as ten varint bytes }.
        let mut expected = vec![0x0a, 0x01, b'a', 0x12, 0x0b, 0x18];
        expected.extend([0xff; 9]);
        expected.push(0x01);
        assert_eq!(kv.0, expected);
    }

    #[test]
    fn a_span_nests_under_its_service() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: None,
            name: "n".into(),
            kind: Kind::Client,
            service: "s".into(),
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes: vec![("k", Value::Str("v".into()))],
            error: true,
        };
        let body = export_request(&[span]);
        // ExportTraceServiceRequest.resource_spans, then ResourceSpans.resource
        // holding `service.name` = "s".
        assert_eq!(body[0], 0x0a);
        let resource = [
            0x0a, 0x15, 0x0a, 0x13, 0x0a, 0x0c, b's', b'e', b'r', b'v', b'i', b'c', b'e', b'.',
            b'n', b'a', b'm', b'e', 0x12, 0x03, 0x0a, 0x01, b's',
        ];
        let at = body.windows(resource.len()).position(|w| w == resource);
        assert!(at.is_some(), "{body:02x?}");
        // Kind CLIENT, the error status, the ids as raw bytes.
        for needle in [
            &[0x30, 0x03][..],
            &[0x7a, 0x02, 0x18, 0x02],
            &[0x12, 0x08, 2, 2],
        ] {
            assert!(
                body.windows(needle.len()).any(|w| w == needle),
                "{needle:02x?}"
            );
        }
    }
}
