//! A partition's durable progress, stored next to the results in S3.
//!
//! S3, not Kafka, is the source of truth for what was written: a batch becomes part of the
//! output when its checkpoint is replaced (conditionally on the previous version, so a
//! stale owner of the partition cannot), and Kafka offsets are committed only after that.
//! See the processor's `sink` module for the protocol.

use serde::{Deserialize, Serialize};

use crate::counts::{CountRow, Counts};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The first offset not yet reflected in S3: where processing resumes.
    pub next_offset: i64,
    /// Valid tickets written so far from this partition.
    pub tickets: u64,
    /// Messages sent to the dead-letter topic so far from this partition.
    pub dead_letters: u64,
    /// Running totals over every ticket written from this partition.
    pub counts: Vec<CountRow>,
    /// A batch whose checkpoint is durable but whose final object may not be written yet:
    /// whoever loads this checkpoint finishes it by copying `staging_key` to `final_key`.
    pub pending: Option<Pending>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub staging_key: String,
    pub final_key: String,
}

impl Checkpoint {
    pub fn counts(&self) -> Counts {
        Counts::from_rows(&self.counts)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Checkpoint, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
