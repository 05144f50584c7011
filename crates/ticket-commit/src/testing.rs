//! What the committers' tests share (feature `testing`): batches as Kafka would give them,
//! again and again the same.

use bytes::Bytes;
use ticket_core::counts::Counts;
use ticket_core::keys::Hour;

use crate::{Batch, Object};

/// The hour of the ticket at offset `o`: five offsets per hour, so batches span hours.
pub fn hour_of(o: i64) -> Hour {
    Hour::from_millis(o / 5 * 3_600_000)
}

/// A batch of offsets `first..=last`, every offset a valid ticket written as its own line
/// in the object of its hour, except multiples of 7, which are dead letters.
pub fn batch(first: i64, last: i64) -> Batch {
    let valid: Vec<i64> = (first..=last).filter(|o| o % 7 != 0).collect();
    let mut objects: Vec<Object> = Vec::new();
    for &o in &valid {
        let line = Bytes::from(format!("{o}\n"));
        match objects.last_mut() {
            Some(obj) if obj.hour == hour_of(o) => {
                obj.body = [obj.body.clone(), line].concat().into();
                obj.last = o;
                obj.tickets += 1;
            }
            _ => objects.push(Object {
                hour: hour_of(o),
                first: o,
                last: o,
                tickets: 1,
                body: line,
            }),
        }
    }
    let mut counts = Counts::default();
    counts.add(&ticket_core::counts::CountRow {
        request_type: "billing".into(),
        priority: "low".into(),
        support_team: "Billing Team".into(),
        count: valid.len() as u64,
    });
    Batch {
        first,
        last,
        objects,
        extension: "jsonl",
        valid: valid.len() as u64,
        dead_letters: (last - first + 1) as u64 - valid.len() as u64,
        counts,
        steps: Default::default(),
    }
}
