//! The ticket record, in the original PySpark system's schema.

use std::borrow::Cow;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

/// The request types the original producer drew from. Any other string is still a valid
/// `request_type`; it is routed to the default team, as the original did.
pub const REQUEST_TYPES: [&str; 4] = ["support", "billing", "technical", "other"];

/// How urgent a ticket is. Anything else is rejected (the original silently produced nulls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Medium, Priority::High];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// One customer support ticket: one JSON object per Kafka message, keyed by `ticket_id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ticket {
    pub ticket_id: String,
    pub client_id: i64,
    /// Written as RFC 3339. The original's offset-less ISO form is read as UTC.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<FixedOffset>,
    pub request: String,
    pub request_type: String,
    pub priority: Priority,
}

/// A ticket as it lands under `tickets_with_team/`: every original field plus `support_team`.
#[derive(Debug, Serialize)]
pub struct TicketWithTeam<'a> {
    pub ticket_id: &'a str,
    pub client_id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<FixedOffset>,
    pub request: &'a str,
    pub request_type: &'a str,
    pub priority: Priority,
    pub support_team: &'a str,
}

impl Ticket {
    pub fn with_team<'a>(&'a self, support_team: &'a str) -> TicketWithTeam<'a> {
        TicketWithTeam {
            ticket_id: &self.ticket_id,
            client_id: self.client_id,
            created_at: self.created_at,
            request: &self.request,
            request_type: &self.request_type,
            priority: self.priority,
            support_team,
        }
    }

    /// The ticket as one JSON object (the Kafka message value).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A valid ticket whose text is borrowed from the message bytes where it can be: what the
/// processor handles per message, so a typical ticket costs no allocation. Built only by
/// [`crate::validate::decode_ref`].
#[derive(Debug, Clone, PartialEq)]
pub struct TicketRef<'a> {
    // Invariant: a `Cow::Borrowed` string here is the raw text between the quotes of a JSON
    // string that had no escape sequence, so it needs no escaping when written back.
    pub(crate) ticket_id: Cow<'a, str>,
    pub(crate) client_id: i64,
    pub(crate) created_at: DateTime<FixedOffset>,
    /// `created_at` as the message spelled it.
    pub(crate) created_at_text: Cow<'a, str>,
    pub(crate) request: Cow<'a, str>,
    pub(crate) request_type: Cow<'a, str>,
    pub(crate) priority: Priority,
}

impl<'a> TicketRef<'a> {
    pub fn ticket_id(&self) -> &str {
        &self.ticket_id
    }

    pub fn client_id(&self) -> i64 {
        self.client_id
    }

    pub fn created_at(&self) -> DateTime<FixedOffset> {
        self.created_at
    }

    pub fn request(&self) -> &str {
        &self.request
    }

    pub fn request_type(&self) -> &str {
        &self.request_type
    }

    pub fn priority(&self) -> Priority {
        self.priority
    }

    pub fn into_owned(self) -> Ticket {
        Ticket {
            ticket_id: self.ticket_id.into_owned(),
            client_id: self.client_id,
            created_at: self.created_at,
            request: self.request.into_owned(),
            request_type: self.request_type.into_owned(),
            priority: self.priority,
        }
    }

    /// Appends the ticket with its team as one JSON object: the same bytes as serializing
    /// [`TicketWithTeam`] with serde_json, but text that needs no escaping is copied as is.
    pub fn write_with_team(&self, support_team: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ticket_id\":");
        json_str(out, &self.ticket_id);
        out.extend_from_slice(b",\"client_id\":");
        json_value(out, &self.client_id);
        out.extend_from_slice(b",\"created_at\":");
        if is_canonical_timestamp(&self.created_at_text) {
            json_str(out, &self.created_at_text);
        } else {
            json_value(out, &canonical_timestamp(&self.created_at));
        }
        out.extend_from_slice(b",\"request\":");
        json_str(out, &self.request);
        out.extend_from_slice(b",\"request_type\":");
        json_str(out, &self.request_type);
        out.extend_from_slice(b",\"priority\":\"");
        out.extend_from_slice(self.priority.as_str().as_bytes());
        out.extend_from_slice(b"\",\"support_team\":");
        json_value(out, support_team);
        out.push(b'}');
    }
}

// The Cow is the point: borrowed text is known not to need escaping.
#[allow(clippy::ptr_arg)]
fn json_str(out: &mut Vec<u8>, s: &Cow<'_, str>) {
    match s {
        Cow::Borrowed(raw) => {
            out.push(b'"');
            out.extend_from_slice(raw.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(s) => json_value(out, s),
    }
}

fn json_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Strings and integers always serialize, and writing into a Vec cannot fail.
    let _ = serde_json::to_writer(out, v);
}

/// Already in the form we write (`YYYY-MM-DDTHH:MM:SS.ffffffZ`), given that it parsed.
fn is_canonical_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27 && b[10] == b'T' && b[19] == b'.' && b[26] == b'Z'
}

fn canonical_timestamp(t: &DateTime<FixedOffset>) -> String {
    let use_z = t.offset().local_minus_utc() == 0;
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, use_z)
}

/// Microsecond precision like the original, and `Z` rather than `+00:00` for UTC.
fn rfc3339<S: serde::Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&canonical_timestamp(t))
}

/// Field names as they appear in JSON, in schema order.
pub const FIELDS: [&str; 6] = [
    "ticket_id",
    "client_id",
    "created_at",
    "request",
    "request_type",
    "priority",
];

#[derive(Deserialize)]
pub(crate) struct RawTicket<'a> {
    #[serde(borrow)]
    pub ticket_id: std::borrow::Cow<'a, str>,
    pub client_id: i64,
    #[serde(borrow)]
    pub created_at: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub request: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub request_type: std::borrow::Cow<'a, str>,
    pub priority: Priority,
}
