//! The S3 layout. Other tools read it, so it is a contract:
//!
//! ```text
//! {prefix}tickets_with_team/topic={topic}/partition={p}/{first:020}-{last:020}.jsonl
//! {prefix}counts_by_request_type/latest.jsonl
//! {prefix}_checkpoints/topic={topic}/partition={p}.json      (the processor's own progress)
//! {prefix}_staging/topic={topic}/partition={p}/{first:020}-{id}.jsonl   (transient)
//! ```
//!
//! Offsets are zero-padded so that keys sort in offset order.

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

    pub fn tickets_prefix(&self) -> String {
        format!("{}tickets_with_team/", self.prefix)
    }

    /// The object holding a partition's valid tickets from offset `first` to `last` (inclusive).
    pub fn tickets_key(&self, partition: i32, first: i64, last: i64) -> String {
        format!(
            "{}topic={}/partition={partition}/{first:020}-{last:020}.jsonl",
            self.tickets_prefix(),
            self.topic
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

    /// A unique name per attempt: two owners of a partition never write the same staging key.
    pub fn staging_key(&self, partition: i32, first: i64, attempt: &str) -> String {
        format!(
            "{}{first:020}-{attempt}.jsonl",
            self.staging_prefix(partition)
        )
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
        assert_eq!(
            l.tickets_key(2, 100, 199),
            "prod/tickets_with_team/topic=client_tickets/partition=2/00000000000000000100-00000000000000000199.jsonl"
        );
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
        assert!(l.tickets_key(0, 9, 99) < l.tickets_key(0, 100, 150));
    }
}
