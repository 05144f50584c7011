//! A partition's durable progress, stored next to the results in S3.
//!
//! S3, not Kafka, is the source of truth for what was written: a batch becomes part of the
//! output when its checkpoint is replaced (conditionally on the previous version, so a
//! stale owner of the partition cannot), and Kafka offsets are committed only after that.
//! See the `ticket-objects` crate for the protocol.
//!
//! Two generations of the format are read:
//! - this version's: [`Checkpoint::batch`] records the intent of the last batch committed
//!   (its offsets, and per object its key, hour, offsets, ticket count and checksum); its
//!   objects are created after the checkpoint, each once, and rebuilt from Kafka by a new
//!   owner if some are missing;
//! - the earlier versions': [`Checkpoint::pending`] names staged copies (`staging_key ->
//!   final_key`) still to be copied into place. A checkpoint written by an earlier version is
//!   finished from its staging objects; this version never writes `pending`, and earlier
//!   versions ignore `batch` (serde drops unknown fields), so they never touch its keys.

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
    /// The objects of a batch whose checkpoint is durable but whose final objects may not be
    /// written yet (one per hour the batch's tickets fall in): whoever loads this checkpoint
    /// finishes each by copying `staging_key` to `final_key`. Written by earlier versions only;
    /// this version finishes it and never writes it.
    ///
    /// Written as the earlier versions wrote it while it is one object (nearly always), so
    /// that they can still read it (a rollback, a rolling upgrade); as a list only for a batch
    /// that spans hours, which an earlier version then refuses loudly rather than skip it.
    /// Left out when empty; `null`, one object or a list all read back.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        serialize_with = "one_or_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pending: Vec<Pending>,
    /// The last batch committed (this version's protocol): what its objects must hold. Its
    /// objects are written after this checkpoint; a new owner that finds one missing rebuilds
    /// exactly `first..=last` from Kafka and checks the result against this record before it
    /// writes anything. Left out when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Intent>,
}

/// A committed batch, as recorded before its objects are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// First and last offsets the batch covers (valid tickets and dead letters): a rebuild
    /// reads exactly this range, never re-cut by the batch policy.
    pub first: i64,
    pub last: i64,
    /// The objects' format (their file extension: `jsonl`, `parquet`).
    pub format: String,
    /// What the objects were made with: the routing table's digest and the encoding's
    /// version. A rebuild made with anything else would write other bytes under these keys.
    pub routing: String,
    pub encoding: u32,
    /// One per UTC hour the batch's tickets fall in; none for a batch of dead letters only.
    pub objects: Vec<Planned>,
}

/// One object of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    pub key: String,
    /// The UTC hour of its tickets (`date=`/`hour=` in the key).
    pub hour: chrono::DateTime<chrono::Utc>,
    /// Offsets of its first and last ticket.
    pub first: i64,
    pub last: i64,
    pub tickets: u64,
    /// CRC32C of the body, the checksum S3 also checks on upload (`x-amz-checksum-crc32c`).
    pub crc32c: u32,
}

fn one_or_list<S: serde::Serializer>(pending: &[Pending], s: S) -> Result<S::Ok, S::Error> {
    match pending {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Pending>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Pending),
        Many(Vec<Pending>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_of_the_earlier_format_still_load() {
        let one = br#"{"next_offset":20,"tickets":17,"dead_letters":3,"counts":[],
            "pending":{"staging_key":"_staging/a","final_key":"tickets_with_team/b"}}"#;
        let cp = Checkpoint::from_json(one).expect("one pending object");
        assert_eq!(cp.next_offset, 20);
        assert_eq!(cp.pending.len(), 1);
        assert_eq!(cp.pending[0].final_key, "tickets_with_team/b");
        let none = br#"{"next_offset":5,"tickets":5,"dead_letters":0,"counts":[],"pending":null}"#;
        assert!(
            Checkpoint::from_json(none)
                .expect("null")
                .pending
                .is_empty()
        );
    }

    fn intent() -> Intent {
        Intent {
            first: 10,
            last: 19,
            format: "jsonl".into(),
            routing: "0a1b2c3d".into(),
            encoding: 1,
            objects: vec![Planned {
                key: "tickets_with_team/topic=t/date=2026-11-30/hour=16/partition=0/a.jsonl".into(),
                hour: chrono::DateTime::from_timestamp(1_764_518_400, 0).unwrap_or_default(),
                first: 11,
                last: 19,
                tickets: 8,
                crc32c: 123_456,
            }],
        }
    }

    #[test]
    fn a_checkpoint_with_a_batch_reads_back_as_written() {
        let cp = Checkpoint {
            next_offset: 20,
            tickets: 8,
            dead_letters: 2,
            batch: Some(intent()),
            ..Checkpoint::default()
        };
        assert_eq!(Checkpoint::from_json(&cp.to_json()).expect("json"), cp);
        let none = Checkpoint::default().to_json();
        assert!(!String::from_utf8_lossy(&none).contains("batch"));
    }

    /// How the earlier versions (up to 0.1.0, commit 48c5c9e) read a checkpoint: the same
    /// fields without `batch`, `pending` as one object or a list of staged copies.
    #[derive(Deserialize)]
    struct EarlierCheckpoint {
        next_offset: i64,
        tickets: u64,
        #[serde(default, deserialize_with = "one_or_many")]
        pending: Vec<Pending>,
    }

    #[test]
    fn an_earlier_version_reads_this_versions_checkpoint_without_touching_its_objects() {
        // A rollback: the earlier version resumes after the batch and has nothing to copy or
        // delete (it would delete a `staging_key` after copying it, so none is ever written).
        let cp = Checkpoint {
            next_offset: 20,
            tickets: 8,
            batch: Some(intent()),
            ..Checkpoint::default()
        };
        let old: EarlierCheckpoint = serde_json::from_slice(&cp.to_json()).expect("old reader");
        assert_eq!((old.next_offset, old.tickets), (20, 8));
        assert!(old.pending.is_empty());
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let mut cp = Checkpoint {
            next_offset: 7,
            ..Checkpoint::default()
        };
        assert!(!String::from_utf8_lossy(&cp.to_json()).contains("pending"));
        cp.pending = vec![
            Pending {
                staging_key: "s0".into(),
                final_key: "f0".into(),
            },
            Pending {
                staging_key: "s1".into(),
                final_key: "f1".into(),
            },
        ];
        assert_eq!(Checkpoint::from_json(&cp.to_json()).expect("json"), cp);
        // One pending object is written in the earlier versions' form.
        cp.pending.truncate(1);
        let v: serde_json::Value = serde_json::from_slice(&cp.to_json()).expect("json");
        assert_eq!(v["pending"]["final_key"], "f0");
        assert_eq!(Checkpoint::from_json(&cp.to_json()).expect("json"), cp);
    }
}
