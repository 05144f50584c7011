//! The ticket record, in the original PySpark system's schema.

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

/// Microsecond precision like the original, and `Z` rather than `+00:00` for UTC.
fn rfc3339<S: serde::Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
    let use_z = t.offset().local_minus_utc() == 0;
    s.collect_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, use_z))
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
