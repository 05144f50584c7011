//! The table's maintenance figures, on the processor's `/metrics` when it writes the table.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cheap to clone: every field is a shared handle.
#[derive(Clone, Default)]
pub struct TableMetrics {
    /// Rewrites committed by this processor's maintenance.
    pub compactions: Counter,
    /// Data files those rewrites replaced.
    pub files_compacted: Counter,
    /// Bytes they wrote.
    pub bytes_rewritten: Counter,
    /// Replaced data files deleted once the table's retention for them had passed.
    pub files_vacuumed: Counter,
    /// Commit entries in the table's log (`_delta_log/*.json`), as this processor's upkeep
    /// last saw them.
    pub log_entries: Gauge,
    /// Data files and partition-hours of the Kafka partitions this processor owns, by
    /// `hours="open"|"closed"`, as the last maintenance round left them (a round follows each
    /// new hour; closed: due for compaction, so 1 file per partition-hour, or a few for an
    /// hour larger than the target).
    pub files: Family<[(&'static str, &'static str); 1], Gauge>,
    pub partition_hours: Family<[(&'static str, &'static str); 1], Gauge>,
}

impl TableMetrics {
    /// Adds them to `registry` (prefixed `table_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("table");
        r.register(
            "compactions",
            "Rewrites of a partition-hour's files into one committed by this processor",
            self.compactions.clone(),
        );
        r.register(
            "files_compacted",
            "Data files replaced by this processor's compactions",
            self.files_compacted.clone(),
        );
        r.register(
            "bytes_rewritten",
            "Bytes written by this processor's compactions",
            self.bytes_rewritten.clone(),
        );
        r.register(
            "files_vacuumed",
            "Replaced data files deleted after delta.deletedFileRetentionDuration",
            self.files_vacuumed.clone(),
        );
        r.register(
            "log_entries",
            "Commit entries in the table's log",
            self.log_entries.clone(),
        );
        r.register(
            "files",
            "Data files of the partitions this processor owns, in open or closed partition-hours",
            self.files.clone(),
        );
        r.register(
            "partition_hours",
            "Partition-hours of the partitions this processor owns, open or closed (COMPACT_CLOSED_AFTER)",
            self.partition_hours.clone(),
        );
    }
}
