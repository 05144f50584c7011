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
    /// The objects of a batch whose checkpoint is durable but whose final objects may not be
    /// written yet (one per hour the batch's tickets fall in): whoever loads this checkpoint
    /// finishes each by copying `staging_key` to `final_key`.
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
