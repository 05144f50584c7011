//! Running totals of valid tickets, by request type, priority and team.
//!
//! The per-batch numbers come from DataFusion in the processor; this is the small,
//! exactly mergeable form they are kept in, and the JSON Lines written to
//! `counts_by_request_type/latest.jsonl`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::routing::Routing;

/// One group of a count: a request type, a priority and the team it was routed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountRow {
    pub request_type: String,
    pub priority: String,
    pub support_team: String,
    pub count: u64,
}

/// Totals keyed by (request type, priority, team).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<(String, String, String), u64>);

/// A line of `counts_by_request_type/latest.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTypeCount {
    pub request_type: String,
    pub count: u64,
    /// The team this request type is routed to now.
    pub support_team: String,
    pub by_priority: BTreeMap<String, u64>,
    /// Which teams the tickets went to (differs from `support_team` only if routing changed).
    pub by_team: BTreeMap<String, u64>,
}

impl Counts {
    pub fn add(&mut self, row: &CountRow) {
        let key = (
            row.request_type.clone(),
            row.priority.clone(),
            row.support_team.clone(),
        );
        *self.0.entry(key).or_default() += row.count;
    }

    pub fn merge(&mut self, other: &Counts) {
        for row in other.rows() {
            self.add(&row);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn rows(&self) -> Vec<CountRow> {
        self.0
            .iter()
            .map(|((request_type, priority, support_team), count)| CountRow {
                request_type: request_type.clone(),
                priority: priority.clone(),
                support_team: support_team.clone(),
                count: *count,
            })
            .collect()
    }

    pub fn from_rows<'a>(rows: impl IntoIterator<Item = &'a CountRow>) -> Counts {
        let mut c = Counts::default();
        for r in rows {
            c.add(r);
        }
        c
    }

    /// One entry per request type, sorted by request type.
    pub fn by_request_type(&self, routing: &Routing) -> Vec<RequestTypeCount> {
        let mut out: BTreeMap<&str, RequestTypeCount> = BTreeMap::new();
        for ((rt, priority, team), n) in &self.0 {
            let line = out.entry(rt).or_insert_with(|| RequestTypeCount {
                request_type: rt.clone(),
                count: 0,
                support_team: routing.team_for(rt).to_string(),
                by_priority: BTreeMap::new(),
                by_team: BTreeMap::new(),
            });
            line.count += n;
            *line.by_priority.entry(priority.clone()).or_default() += n;
            *line.by_team.entry(team.clone()).or_default() += n;
        }
        out.into_values().collect()
    }

    /// The JSON Lines body of `latest.jsonl`.
    pub fn to_jsonl(&self, routing: &Routing) -> Vec<u8> {
        let mut body = Vec::new();
        for line in self.by_request_type(routing) {
            // A struct of strings and integers always serializes.
            if serde_json::to_writer(&mut body, &line).is_ok() {
                body.push(b'\n');
            }
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rt: &str, p: &str, team: &str, n: u64) -> CountRow {
        CountRow {
            request_type: rt.into(),
            priority: p.into(),
            support_team: team.into(),
            count: n,
        }
    }

    #[test]
    fn totals_merge_and_fold_into_one_line_per_request_type() {
        let mut a = Counts::from_rows(&[
            row("billing", "high", "Billing Team", 2),
            row("other", "low", "General Support", 1),
        ]);
        let b = Counts::from_rows(&[
            row("billing", "low", "Billing Team", 3),
            row("billing", "high", "Billing Team", 1),
        ]);
        a.merge(&b);
        assert_eq!(a.total(), 7);
        let text = String::from_utf8(a.to_jsonl(&Routing::default())).expect("utf8");
        assert_eq!(
            text,
            "{\"request_type\":\"billing\",\"count\":6,\"support_team\":\"Billing Team\",\"by_priority\":{\"high\":3,\"low\":3},\"by_team\":{\"Billing Team\":6}}\n\
             {\"request_type\":\"other\",\"count\":1,\"support_team\":\"General Support\",\"by_priority\":{\"low\":1},\"by_team\":{\"General Support\":1}}\n"
        );
    }
}
