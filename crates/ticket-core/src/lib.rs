//! The pure heart of the ticket pipeline: no I/O happens in this crate.
//!
//! - [`ticket`]: the ticket record as it travels on the topic and as it lands in S3.
//! - [`validate`]: bytes from Kafka (or a line of a file) to a [`Ticket`] or a reason a person can act on.
//! - [`generate`]: plausible random tickets from an injected RNG (the producer's source).
//! - [`routing`]: request type to support team, the original mapping by default.
//! - [`counts`]: running totals by request type, priority and team, and their JSON Lines form.
//! - [`keys`]: the S3 object layout, which other tools read as a contract.
//! - [`batch`]: when a micro-batch is flushed (size or age).
//! - [`checkpoint`]: the per-partition progress record that makes S3 output exactly-once.

pub mod batch;
pub mod checkpoint;
pub mod counts;
pub mod generate;
pub mod keys;
pub mod routing;
pub mod ticket;
pub mod validate;

pub use routing::Routing;
pub use ticket::{Priority, Ticket, TicketRef};
pub use validate::{Invalid, decode, decode_ref};
