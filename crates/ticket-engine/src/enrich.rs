//! Message bytes to output: decode and validate, add `support_team`, append the ticket to the
//! object's rows (JSON Lines or Parquet columns) and to the grouping columns. Shared by the
//! streaming path and `process-file`, so both produce the same output for the same input.

use ticket_core::{Invalid, Routing, TicketRef, decode_ref};

use crate::aggregate::Columns;
use crate::output::{OutputFormat, Rows};

pub struct BatchBuilder {
    /// The valid tickets with their team, in the output format.
    pub rows: Rows,
    pub columns: Columns,
    pub valid: u64,
}

impl BatchBuilder {
    pub fn new(format: OutputFormat) -> BatchBuilder {
        BatchBuilder {
            rows: Rows::new(format),
            columns: Columns::default(),
            valid: 0,
        }
    }

    /// For about `records` messages of `bytes` bytes in all, so that the output does not
    /// grow (and get copied) step by step.
    pub fn with_room_for(format: OutputFormat, records: usize, bytes: usize) -> BatchBuilder {
        BatchBuilder {
            rows: Rows::with_room_for(format, records, bytes),
            columns: Columns::with_room_for(records),
            valid: 0,
        }
    }

    /// Adds one message; an invalid one is left out and its reason returned.
    pub fn push(&mut self, routing: &Routing, bytes: &[u8]) -> Result<(), Invalid> {
        let ticket = decode_ref(bytes)?;
        self.push_ticket(routing, &ticket);
        Ok(())
    }

    /// Adds a ticket already decoded.
    pub fn push_ticket(&mut self, routing: &Routing, ticket: &TicketRef<'_>) {
        let team = routing.team_for(ticket.request_type());
        self.rows.push(ticket, team);
        self.columns
            .push(ticket.request_type(), ticket.priority().as_str(), team);
        self.valid += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_ticket_keeps_its_fields_and_gains_its_team() {
        let mut b = BatchBuilder::new(OutputFormat::Jsonl);
        let input = br#"{"ticket_id":"T-1","client_id":5000,"created_at":"2025-03-01T10:00:00Z","request":"Help","request_type":"technical","priority":"low","extra":1}"#;
        b.push(&Routing::default(), input).expect("valid");
        assert!(b.push(&Routing::default(), b"{}").is_err());
        assert_eq!(b.valid, 1);
        let Rows::Jsonl(body) = &b.rows else {
            panic!("JSON Lines rows")
        };
        let line: serde_json::Value = serde_json::from_slice(body).expect("json line");
        assert_eq!(
            line,
            serde_json::json!({"ticket_id":"T-1","client_id":5000,"created_at":"2025-03-01T10:00:00.000000Z",
                "request":"Help","request_type":"technical","priority":"low","support_team":"Tech Support"})
        );
        assert_eq!(b.columns.len(), 1);
    }
}
