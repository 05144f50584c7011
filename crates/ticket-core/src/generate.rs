//! Plausible random tickets. The RNG is injected so a seeded run is reproducible.

use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::ticket::{Priority, REQUEST_TYPES, Ticket};

/// Draws tickets like the original producer did (uniform request type, priority and client),
/// with sentences a customer would write and ids that never collide across runs.
pub struct Generator<R> {
    rng: R,
    /// Upper bound of `created_at` (the original drew between 2025-01-01 and now).
    now: DateTime<Utc>,
    /// Distinguishes this run's ticket ids from every other run's.
    run_id: String,
    next_seq: u64,
}

impl<R: Rng> Generator<R> {
    /// `run_id` must differ between runs (the producer uses a UUIDv7, time-ordered and random);
    /// with a seeded `rng` and the same `now`, every field but the id is reproducible.
    pub fn new(rng: R, now: DateTime<Utc>, run_id: impl Into<String>) -> Self {
        Generator {
            rng,
            now,
            run_id: run_id.into(),
            next_seq: 1,
        }
    }

    pub fn next_ticket(&mut self) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        let start = Utc
            .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        let span = (self.now - start).num_microseconds().unwrap_or(0).max(1);
        let created_at = start + chrono::Duration::microseconds(self.rng.random_range(0..span));
        let request_type = *REQUEST_TYPES.choose(&mut self.rng).unwrap_or(&"other");
        let priority = *Priority::ALL
            .choose(&mut self.rng)
            .unwrap_or(&Priority::Low);
        Ticket {
            ticket_id: format!("TICKET-{}-{seq:06}", self.run_id),
            client_id: self.rng.random_range(1000..=9999),
            created_at: created_at.fixed_offset(),
            request: self.sentence(request_type),
            request_type: request_type.to_string(),
            priority,
        }
    }

    fn sentence(&mut self, request_type: &str) -> String {
        let product = *PRODUCTS.choose(&mut self.rng).unwrap_or(&"account");
        let when = *WHEN.choose(&mut self.rng).unwrap_or(&"today");
        let templates: &[&str] = match request_type {
            "billing" => BILLING,
            "technical" => TECHNICAL,
            "support" => SUPPORT,
            _ => OTHER,
        };
        let template = *templates
            .choose(&mut self.rng)
            .unwrap_or(&"Please help with my {p}.");
        template.replace("{p}", product).replace("{w}", when)
    }
}

const PRODUCTS: &[&str] = &[
    "sensor gateway",
    "analytics dashboard",
    "data export",
    "premium subscription",
    "mobile app",
    "API key",
    "monthly report",
    "temperature probe",
];
const WHEN: &[&str] = &[
    "since this morning",
    "since yesterday",
    "for a week now",
    "after the last update",
    "every time I log in",
];
const BILLING: &[&str] = &[
    "I was charged twice for my {p} this month.",
    "My invoice for the {p} shows the wrong amount.",
    "Could you send me a refund for the {p}? I cancelled it last month.",
    "Why did the price of my {p} go up {w}?",
    "I need a VAT invoice for the {p} purchase.",
];
const TECHNICAL: &[&str] = &[
    "The {p} keeps crashing {w}.",
    "My {p} stopped sending data {w}.",
    "I get a timeout error from the {p} {w}.",
    "The {p} shows readings that are clearly wrong {w}.",
    "I cannot connect the {p} to our network {w}.",
];
const SUPPORT: &[&str] = &[
    "How do I add a colleague to my {p}?",
    "I forgot the password for my {p}.",
    "Can you explain how to configure alerts on the {p}?",
    "Where can I find the user guide for the {p}?",
    "I would like to change the owner of our {p}.",
];
const OTHER: &[&str] = &[
    "I have a suggestion for the {p}.",
    "Do you offer training for the {p}?",
    "Is the {p} available in other countries?",
    "I would like to give feedback about the {p}.",
];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn generator(seed: u64, run: &str) -> Generator<StdRng> {
        let now = Utc
            .with_ymd_and_hms(2026, 6, 1, 0, 0, 0)
            .single()
            .expect("date");
        Generator::new(StdRng::seed_from_u64(seed), now, run)
    }

    #[test]
    fn tickets_are_valid_and_round_trip_through_the_decoder() {
        let mut g = generator(1, "run");
        for _ in 0..500 {
            let t = g.next_ticket();
            assert_eq!(crate::decode(&t.to_json()).expect("valid"), t);
            assert!((1000..=9999).contains(&t.client_id));
            assert!(REQUEST_TYPES.contains(&t.request_type.as_str()));
            assert!(t.request.ends_with('.') || t.request.ends_with('?'));
            assert!(t.created_at.year() >= 2025);
        }
    }

    #[test]
    fn a_seed_reproduces_the_content_and_runs_never_share_an_id() {
        let a: Vec<Ticket> = (0..50)
            .scan(generator(7, "a"), |g, _| Some(g.next_ticket()))
            .collect();
        let b: Vec<Ticket> = (0..50)
            .scan(generator(7, "b"), |g, _| Some(g.next_ticket()))
            .collect();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (&x.request, x.client_id, x.created_at),
                (&y.request, y.client_id, y.created_at)
            );
            assert_ne!(x.ticket_id, y.ticket_id);
        }
    }

    #[test]
    fn every_request_type_and_priority_shows_up() {
        let mut g = generator(3, "r");
        let tickets: Vec<Ticket> = (0..400).map(|_| g.next_ticket()).collect();
        for rt in REQUEST_TYPES {
            assert!(
                tickets.iter().any(|t| t.request_type == rt),
                "{rt} never drawn"
            );
        }
        for p in Priority::ALL {
            assert!(tickets.iter().any(|t| t.priority == p), "{p:?} never drawn");
        }
    }

    use chrono::Datelike;
}
