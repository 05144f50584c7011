//! The S3 layout. Other tools read it, so it is a contract:
//!
//! ```text
//! {prefix}tickets_with_team/topic={topic}/date={YYYY-MM-DD}/hour={HH}/partition={p}/{first:020}-{last:020}.{jsonl|parquet}
//! {prefix}counts_by_request_type/latest.jsonl
//! {prefix}_checkpoints/topic={topic}/partition={p}.json      (the processor's own progress)
//! {prefix}_staging/topic={topic}/partition={p}/{first:020}-{id}-{n}.{ext}   (versions up to 0.1.0 only, transient: finished and deleted by this one)
//! ```
//!
//! `date` and `hour` are Hive-style partition columns: the UTC hour of the records' Kafka
//! timestamps (see [`Hour`]), so a replay writes the same keys as the first run. `first` and
//! `last` are the offsets of the first and last ticket in the object, zero-padded so that keys
//! sort in offset order.
//!
//! Before time partitions, ticket objects were written at
//! `tickets_with_team/topic={topic}/partition={p}/{first:020}-{last:020}.jsonl`; such objects
//! stay where they are.

use chrono::{DateTime, Timelike};

/// The UTC hour a ticket belongs to in the layout: `date=YYYY-MM-DD/hour=HH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour {
    /// Hours since 1970-01-01T00:00Z.
    since_epoch: i64,
}

impl Hour {
    /// The hour of a Kafka timestamp (milliseconds since the epoch).
    pub fn from_millis(ms: i64) -> Hour {
        Hour {
            since_epoch: ms.div_euclid(3_600_000),
        }
    }

    /// The hour of a Kafka timestamp if it is a date at all (a producer sending nanoseconds
    /// or garbage gives years past 262,000): `None` then, for the caller's fallback.
    pub fn of_timestamp(ms: i64) -> Option<Hour> {
        DateTime::from_timestamp_millis(ms).map(|t| Hour::of(&t))
    }

    /// The hour of an instant, in UTC whatever its offset.
    pub fn of<Tz: chrono::TimeZone>(t: &DateTime<Tz>) -> Hour {
        Hour::from_millis(t.timestamp_millis())
    }

    /// The start of the hour, in UTC.
    pub fn start(self) -> DateTime<chrono::Utc> {
        // In range for every hour made by `of` or `of_timestamp` (`from_millis` of a value out
        // of chrono's range reads as the epoch).
        DateTime::from_timestamp(self.since_epoch.saturating_mul(3600), 0).unwrap_or_default()
    }

    /// `date=YYYY-MM-DD/hour=HH`, the Hive-style path segments.
    pub fn path(self) -> String {
        let t = self.start();
        format!("date={}/hour={:02}", t.format("%Y-%m-%d"), t.hour())
    }
}

/// Where one topic's results live in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
    topic: String,
}

impl Layout {
    /// A non-empty prefix gets a trailing `/` if it lacks one, so `S3_PREFIX=prod` means `prod/`.
    pub fn new(prefix: &str, topic: &str) -> Layout {
        let mut prefix = prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout {
            prefix,
            topic: topic.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Kafka topic whose results these are.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn tickets_prefix(&self) -> String {
        format!("{}tickets_with_team/", self.prefix)
    }

    /// The object holding a partition's valid tickets of one hour, from offset `first` to
    /// `last` (inclusive), in the format of extension `ext` (`jsonl`, `parquet`).
    pub fn tickets_key(
        &self,
        partition: i32,
        hour: Hour,
        first: i64,
        last: i64,
        ext: &str,
    ) -> String {
        format!(
            "{}topic={}/{}/partition={partition}/{first:020}-{last:020}.{ext}",
            self.tickets_prefix(),
            self.topic,
            hour.path(),
        )
    }

    pub fn counts_key(&self) -> String {
        format!("{}counts_by_request_type/latest.jsonl", self.prefix)
    }

    pub fn checkpoints_prefix(&self) -> String {
        format!("{}_checkpoints/topic={}/", self.prefix, self.topic)
    }

    pub fn checkpoint_key(&self, partition: i32) -> String {
        format!("{}partition={partition}.json", self.checkpoints_prefix())
    }

    pub fn staging_prefix(&self, partition: i32) -> String {
        format!(
            "{}_staging/topic={}/partition={partition}/",
            self.prefix, self.topic
        )
    }

    /// A unique name per attempt and object (`n`: the object's number within the batch): two
    /// owners of a partition never write the same staging key.
    pub fn staging_key(
        &self,
        partition: i32,
        first: i64,
        attempt: &str,
        n: usize,
        ext: &str,
    ) -> String {
        format!(
            "{}{first:020}-{attempt}-{n}.{ext}",
            self.staging_prefix(partition)
        )
    }

    /// The offset a staging key's batch starts at, if it is one of this partition's.
    pub fn first_of_staging(&self, partition: i32, key: &str) -> Option<i64> {
        key.strip_prefix(&self.staging_prefix(partition))?
            .split('-')
            .next()?
            .parse()
            .ok()
    }

    /// The partition a checkpoint key belongs to, if it is one of this layout's.
    pub fn partition_of_checkpoint(&self, key: &str) -> Option<i32> {
        key.strip_prefix(&self.checkpoints_prefix())?
            .strip_prefix("partition=")?
            .strip_suffix(".json")?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = Layout::new("prod", "client_tickets");
        // 2026-11-29T08:59:59.999Z
        let hour = Hour::from_millis(1_795_942_799_999);
        assert_eq!(
            l.tickets_key(2, hour, 100, 199, "jsonl"),
            "prod/tickets_with_team/topic=client_tickets/date=2026-11-29/hour=08/partition=2/00000000000000000100-00000000000000000199.jsonl"
        );
        let staging = l.staging_key(2, 100, "abc", 1, "parquet");
        assert_eq!(
            staging,
            "prod/_staging/topic=client_tickets/partition=2/00000000000000000100-abc-1.parquet"
        );
        assert_eq!(l.first_of_staging(2, &staging), Some(100));
        assert_eq!(l.first_of_staging(3, &staging), None);
        assert_eq!(l.counts_key(), "prod/counts_by_request_type/latest.jsonl");
        assert_eq!(
            l.checkpoint_key(2),
            "prod/_checkpoints/topic=client_tickets/partition=2.json"
        );
        assert_eq!(l.partition_of_checkpoint(&l.checkpoint_key(11)), Some(11));
        assert_eq!(l.partition_of_checkpoint("prod/other.json"), None);
        assert_eq!(
            Layout::new("", "t").counts_key(),
            "counts_by_request_type/latest.jsonl"
        );
        assert_eq!(Layout::new("a/b/", "t").prefix(), "a/b/");
    }

    #[test]
    fn ticket_keys_sort_in_offset_order() {
        let l = Layout::new("", "t");
        let h = Hour::from_millis(0);
        assert!(l.tickets_key(0, h, 9, 99, "jsonl") < l.tickets_key(0, h, 100, 150, "jsonl"));
    }

    #[test]
    fn an_hour_is_the_utc_hour_of_the_timestamp_whatever_the_offset() {
        let at = |s: &str| Hour::of(&DateTime::parse_from_rfc3339(s).expect("timestamp"));
        assert_eq!(at("2026-11-29T08:00:00Z").path(), "date=2026-11-29/hour=08");
        assert_eq!(at("2026-11-29T08:59:59.999Z"), at("2026-11-29T08:00:00Z"));
        assert_ne!(at("2026-11-29T09:00:00Z"), at("2026-11-29T08:59:59.999Z"));
        // 00:30 at +01:00 is 23:30 UTC the day before.
        assert_eq!(
            at("2026-11-30T00:30:00+01:00").path(),
            "date=2026-11-29/hour=23"
        );
        // Before the epoch, hours still start on the hour.
        assert_eq!(Hour::from_millis(-1).path(), "date=1969-12-31/hour=23");
        assert!(Hour::from_millis(3_600_000) > Hour::from_millis(3_599_999));
        // Nanoseconds sent as milliseconds: not a date.
        assert_eq!(Hour::of_timestamp(1_795_942_799_500_000_000), None);
        assert_eq!(
            Hour::of_timestamp(1_795_942_799_500)
                .map(Hour::path)
                .as_deref(),
            Some("date=2026-11-29/hour=08")
        );
    }
}
