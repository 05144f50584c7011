//! Bytes to a valid [`Ticket`], or a reason a person can act on.
//!
//! The fast path deserializes straight into the typed record. Only when that fails do we
//! parse again, loosely, to say precisely which field is wrong and why: invalid input is
//! rare, and its reason is what an operator reads in the dead-letter topic.

use std::borrow::Cow;

use chrono::{DateTime, FixedOffset, NaiveDateTime};
use serde_json::Value;

use crate::ticket::{Priority, RawTicket, Ticket, TicketRef};

/// Why a message is not a valid ticket. The `Display` form is the `error.message` header
/// written to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("empty message: expected one JSON object per message")]
    Empty,
    #[error("message is not valid UTF-8 (invalid byte at position {0})")]
    NotUtf8(usize),
    #[error("malformed or truncated JSON: {0}")]
    Malformed(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

/// Decodes and validates one message value.
pub fn decode(bytes: &[u8]) -> Result<Ticket, Invalid> {
    decode_ref(bytes).map(TicketRef::into_owned)
}

/// Decodes and validates one message value, borrowing its text from `bytes`.
pub fn decode_ref(bytes: &[u8]) -> Result<TicketRef<'_>, Invalid> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Invalid::Empty);
    }
    // One UTF-8 check for the whole message; parsing from `str` then skips its own checks.
    let text = std::str::from_utf8(bytes).map_err(|e| Invalid::NotUtf8(e.valid_up_to()))?;
    match serde_json::from_str::<RawTicket>(text) {
        Ok(raw) => from_raw(raw),
        Err(fast_error) => Err(explain(bytes, fast_error)),
    }
}

fn from_raw(raw: RawTicket<'_>) -> Result<TicketRef<'_>, Invalid> {
    if raw.ticket_id.trim().is_empty() {
        return Err(Invalid::Field {
            field: "ticket_id",
            problem: "must be a non-empty string".into(),
        });
    }
    let created_at = parse_timestamp(&raw.created_at).ok_or_else(|| Invalid::Field {
        field: "created_at",
        problem: format!(
            "must be an RFC 3339 timestamp such as 2025-10-20T03:00:23.010952Z, found {:?}",
            raw.created_at
        ),
    })?;
    Ok(TicketRef {
        ticket_id: raw.ticket_id,
        client_id: raw.client_id,
        created_at,
        created_at_text: raw.created_at,
        request: raw.request,
        request_type: raw.request_type,
        priority: raw.priority,
    })
}

/// RFC 3339 with an offset, or the original producer's offset-less ISO 8601 form read as UTC.
pub fn parse_timestamp(s: &str) -> Option<DateTime<FixedOffset>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t);
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    Some(naive.and_utc().fixed_offset())
}

/// The slow path: say exactly what is wrong with a message the typed decoder refused.
fn explain(bytes: &[u8], fast_error: serde_json::Error) -> Invalid {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Invalid::Malformed(e.to_string()),
    };
    let Value::Object(map) = value else {
        return Invalid::NotAnObject(kind(&value));
    };
    let field = |name: &'static str| map.get(name).ok_or(Invalid::Missing(name));
    let wrong = |name: &'static str, expected: &str, found: &Value| Invalid::Field {
        field: name,
        problem: format!("must be {expected}, found {} {}", kind(found), short(found)),
    };
    for name in ["ticket_id", "created_at", "request", "request_type"] {
        let v = match field(name) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if !v.is_string() {
            return wrong(name, "a string", v);
        }
    }
    match field("client_id") {
        Ok(v) if v.is_i64() => {}
        Ok(v) => return wrong("client_id", "an integer", v),
        Err(e) => return e,
    }
    match field("priority") {
        Ok(Value::String(s)) if Priority::parse(s).is_some() => {}
        Ok(v) => return wrong("priority", "one of \"low\", \"medium\", \"high\"", v),
        Err(e) => return e,
    }
    // Every field looks right on its own: report what the strict decoder said
    // (for instance a duplicated key).
    Invalid::Malformed(fast_error.to_string())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value quoted for an error message, cut short so a huge field cannot flood a header.
fn short(v: &Value) -> Cow<'static, str> {
    let s = v.to_string();
    if s.len() <= 60 {
        return Cow::Owned(s);
    }
    let cut = (0..=60).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    Cow::Owned(format!("{}...", &s[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = r#"{"ticket_id":"TICKET-1","client_id":1234,"created_at":"2025-10-20T03:00:23.010952","request":"My invoice is wrong","request_type":"billing","priority":"high"}"#;

    fn reason(s: &[u8]) -> String {
        decode(s).expect_err("should be invalid").to_string()
    }

    #[test]
    fn accepts_the_original_producers_output_and_reads_naive_time_as_utc() {
        let t = decode(VALID.as_bytes()).expect("valid");
        assert_eq!(t.ticket_id, "TICKET-1");
        assert_eq!(t.client_id, 1234);
        assert_eq!(t.priority, Priority::High);
        assert_eq!(
            t.created_at.to_rfc3339(),
            "2025-10-20T03:00:23.010952+00:00"
        );
    }

    #[test]
    fn keeps_an_explicit_offset() {
        let s = VALID.replace("2025-10-20T03:00:23.010952", "2025-10-20T03:00:23+02:00");
        let t = decode(s.as_bytes()).expect("valid");
        assert_eq!(t.created_at.offset().local_minus_utc(), 7200);
    }

    #[test]
    fn an_unknown_request_type_is_valid() {
        let s = VALID.replace("\"billing\"", "\"refund\"");
        assert_eq!(decode(s.as_bytes()).expect("valid").request_type, "refund");
    }

    #[test]
    fn every_kind_of_bad_input_has_a_precise_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "empty message"),
            (b"  \n".to_vec(), "empty message"),
            (vec![b'{', 0xff, b'}'], "not valid UTF-8"),
            (
                VALID.as_bytes()[..40].to_vec(),
                "malformed or truncated JSON",
            ),
            (b"[1,2]".to_vec(), "expected a JSON object, found an array"),
            (
                b"\"hello\"".to_vec(),
                "expected a JSON object, found a string",
            ),
            (
                VALID
                    .replace("\"priority\":\"high\"", "\"priority\":\"urgent\"")
                    .into_bytes(),
                "field `priority` must be one of",
            ),
            (
                VALID.replace("1234", "\"1234\"").into_bytes(),
                "field `client_id` must be an integer, found a string \"1234\"",
            ),
            (
                VALID.replace("1234", "12.5").into_bytes(),
                "field `client_id` must be an integer, found a number",
            ),
            (
                VALID.replace("\"TICKET-1\"", "\" \"").into_bytes(),
                "field `ticket_id` must be a non-empty string",
            ),
            (
                VALID
                    .replace("2025-10-20T03:00:23.010952", "yesterday")
                    .into_bytes(),
                "field `created_at` must be an RFC 3339 timestamp",
            ),
            (
                VALID
                    .replace(",\"request_type\":\"billing\"", "")
                    .into_bytes(),
                "missing field `request_type`",
            ),
            (
                VALID
                    .replace("\"My invoice is wrong\"", "null")
                    .into_bytes(),
                "field `request` must be a string, found null",
            ),
        ];
        for (input, expected) in cases {
            let got = reason(&input);
            assert!(
                got.contains(expected),
                "input {:?}: reason {got:?} lacks {expected:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    proptest! {
        /// Any bytes at all are classified, never a panic, and an invalid one always says why.
        #[test]
        fn any_bytes_are_classified(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Err(e) = decode(&bytes) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }

        /// The writer that copies unescaped text as is writes exactly what serde_json would.
        #[test]
        fn the_fast_writer_writes_what_serde_writes(
            id in "\\PC{1,12}|[a-z\"\\\\\u{0}-\u{1f}]{1,8}",
            request in "\\PC{0,40}|[ \"\\\\\n\t\u{7f}é😀]{0,10}",
            created_at in proptest::prop_oneof![
                proptest::strategy::Just("2025-10-20T03:00:23.010952Z"),
                proptest::strategy::Just("2025-10-20T03:00:23.010952"),
                proptest::strategy::Just("2025-10-20T03:00:23Z"),
                proptest::strategy::Just("2025-10-20T05:00:23.5+02:00"),
                proptest::strategy::Just("2016-12-31T23:59:60.123456Z"),
                proptest::strategy::Just("2025-10-20 03:00:23.010952Z"),
            ],
            team in "\\PC{0,10}|[\"\\\\]{1,3}",
        ) {
            let input = serde_json::json!({"ticket_id": id, "client_id": -7, "created_at": created_at,
                "request": request, "request_type": request, "priority": "medium"});
            let bytes = serde_json::to_vec(&input).expect("serialize");
            if let Ok(t) = decode_ref(&bytes) {
                let mut fast = Vec::new();
                t.write_with_team(&team, &mut fast);
                let owned = t.into_owned();
                let reference = serde_json::to_vec(&owned.with_team(&team)).expect("serialize");
                proptest::prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&reference));
            }
        }

        /// Any JSON object whose fields are mutated is classified, and a valid result round-trips.
        #[test]
        fn mutated_tickets_are_classified(
            field in 0usize..6,
            value in proptest::prop_oneof![
                proptest::strategy::Just(Value::Null),
                proptest::num::i64::ANY.prop_map(Value::from),
                proptest::num::f64::NORMAL.prop_map(Value::from),
                ".{0,20}".prop_map(Value::from),
                proptest::bool::ANY.prop_map(Value::from),
            ],
        ) {
            let mut v: Value = serde_json::from_str(VALID).expect("valid json");
            v[crate::ticket::FIELDS[field]] = value;
            let bytes = serde_json::to_vec(&v).expect("serialize");
            if let Ok(t) = decode(&bytes) {
                let again = decode(&t.to_json()).expect("a decoded ticket re-encodes validly");
                proptest::prop_assert_eq!(again, t);
            }
        }
    }
}
