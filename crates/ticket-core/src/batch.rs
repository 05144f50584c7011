//! When a partition's micro-batch is written: whichever of size or age comes first.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Flush once this many messages (valid or not) are buffered.
    pub max_records: usize,
    /// Flush once the buffered output reaches this many bytes.
    pub max_bytes: usize,
    /// Flush once the oldest buffered message has waited this long, so a quiet topic
    /// still reaches S3 promptly.
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    Size,
    Bytes,
    Age,
    /// A committed range being rebuilt from Kafka reached its recorded last offset: it is
    /// cut exactly where it was cut the first time, never by the policy.
    Rebuilt,
}

impl BatchPolicy {
    pub fn due(&self, records: usize, bytes: usize, age: Duration) -> Option<FlushReason> {
        if records == 0 {
            None
        } else if records >= self.max_records {
            Some(FlushReason::Size)
        } else if bytes >= self.max_bytes {
            Some(FlushReason::Bytes)
        } else if age >= self.max_age {
            Some(FlushReason::Age)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_bytes_or_age_trigger_a_flush_and_nothing_flushes_an_empty_batch() {
        let p = BatchPolicy {
            max_records: 10,
            max_bytes: 1000,
            max_age: Duration::from_secs(5),
        };
        assert_eq!(p.due(0, 0, Duration::from_secs(60)), None);
        assert_eq!(p.due(3, 100, Duration::from_secs(1)), None);
        assert_eq!(p.due(10, 100, Duration::ZERO), Some(FlushReason::Size));
        assert_eq!(p.due(3, 1000, Duration::ZERO), Some(FlushReason::Bytes));
        assert_eq!(p.due(1, 1, Duration::from_secs(5)), Some(FlushReason::Age));
    }
}
