//! Message bytes to output: decode and validate, add `support_team`, append the JSON line and
//! the grouping columns. Shared by the streaming path and `process-file`, so both produce the
//! same bytes for the same input.

use ticket_core::{Invalid, Routing, decode_ref};

use crate::aggregate::Columns;

#[derive(Default)]
pub struct BatchBuilder {
    /// JSON Lines of the valid tickets with their team.
    pub body: Vec<u8>,
    pub columns: Columns,
    pub valid: u64,
}

impl BatchBuilder {
    /// Adds one message; an invalid one is left out and its reason returned.
    pub fn push(&mut self, routing: &Routing, bytes: &[u8]) -> Result<(), Invalid> {
        let ticket = decode_ref(bytes)?;
        let team = routing.team_for(ticket.request_type());
        ticket.write_with_team(team, &mut self.body);
        self.body.push(b'\n');
        self.columns
            .push(ticket.request_type(), ticket.priority().as_str(), team);
        self.valid += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_ticket_keeps_its_fields_and_gains_its_team() {
        let mut b = BatchBuilder::default();
        let input = br#"{"ticket_id":"T-1","client_id":5000,"created_at":"2025-03-01T10:00:00Z","request":"Help","request_type":"technical","priority":"low","extra":1}"#;
        b.push(&Routing::default(), input).expect("valid");
        assert!(b.push(&Routing::default(), b"{}").is_err());
        assert_eq!(b.valid, 1);
        let line: serde_json::Value = serde_json::from_slice(&b.body).expect("json line");
        assert_eq!(
            line,
            serde_json::json!({"ticket_id":"T-1","client_id":5000,"created_at":"2025-03-01T10:00:00.000000Z",
                "request":"Help","request_type":"technical","priority":"low","support_team":"Tech Support"})
        );
        assert_eq!(b.columns.len(), 1);
    }
}
