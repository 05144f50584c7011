//! The table's log upkeep, off the commit path: a log checkpoint every `delta.checkpointInterval`
//! versions, and after each the removal of expired log entries, by a task of the writing
//! process's own.
//!
//! delta-rs does both after every commit, before the commit returns: a commit that makes a
//! checkpoint waits for it (the table's whole state read and written as Parquet), and the
//! expired-log cleanup lists the whole `_delta_log` each time, which at several commits a second
//! is soon millions of entries. Here a commit returns as soon as its log entry is written; the
//! upkeep follows. A process that stops before its upkeep ran leaves a checkpoint unmade, and
//! the next one is made at the next interval: readers then replay a few more entries.
//!
//! The cleanup is delta-rs's rule (what it removes is older than the retention and older than
//! a checkpoint every retained version can be read from), read incrementally: the listing
//! starts at the checkpoint the last cleanup kept and stops at the first entry still retained,
//! so each run reads about what it removes. That relies on the listing coming in key order, as
//! S3's ListObjectsV2 (and every S3-compatible store) gives it.

use std::time::Duration;

use deltalake_core::checkpoints::create_checkpoint;
use deltalake_core::logstore::LogStoreRef;
use deltalake_core::table::config::TablePropertiesExt as _;
use deltalake_core::table::state::DeltaTableState;
use deltalake_core::{DeltaTable, DeltaTableError, ObjectMeta};
use futures::StreamExt;
use object_store::ObjectStoreExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// The handle a [`crate::Table`] that writes keeps: told of each version it commits.
pub(crate) struct Upkeep {
    committed: watch::Sender<u64>,
    handled: watch::Receiver<u64>,
}

impl Upkeep {
    /// Starts the upkeep of a table read at `version`, checkpointed every `interval` versions,
    /// its log kept for `retention` (`None`: kept whole, `delta.enableExpiredLogCleanup=false`).
    pub(crate) fn spawn(
        log: LogStoreRef,
        version: u64,
        interval: u64,
        retention: Option<Duration>,
        entries: Gauge,
        vacuum: Option<Counter>,
    ) -> Upkeep {
        let (committed, mut wanted) = watch::channel(version);
        let (done, handled) = watch::channel(version);
        tokio::spawn(async move {
            let interval = interval.max(1);
            let mut last = version;
            // Versions below this are cleaned up already (or were never looked at: 0).
            let mut cleaned_below = 0;
            while wanted.changed().await.is_ok() {
                let v = *wanted.borrow_and_update();
                if (v + 1) / interval > (last + 1) / interval {
                    match checkpoint(&log, v, vacuum.as_ref()).await {
                        Ok(()) if retention.is_none() => {
                            tracing::debug!(version = v, "Checkpointed the table's log.");
                        }
                        Ok(()) => {
                            let retention = retention.unwrap_or_default();
                            let cutoff = chrono::Utc::now().timestamp_millis()
                                - retention.as_millis() as i64;
                            match cleanup(&log, cleaned_below, v, cutoff).await {
                                Ok((below, removed)) => {
                                    cleaned_below = below;
                                    tracing::debug!(
                                        version = v,
                                        removed,
                                        "Checkpointed the table's log; expired entries removed."
                                    );
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "Cannot remove expired entries of the table's log; trying again after the next checkpoint.")
                                }
                            }
                        }
                        Err(e) => tracing::warn!(
                            version = v,
                            error = %e,
                            "Cannot checkpoint the table's log; readers replay more entries until the next checkpoint."
                        ),
                    }
                }
                last = last.max(v);
                // The log's commit entries: from the oldest the cleanup kept to this one.
                entries.set((v + 1).saturating_sub(cleaned_below) as i64);
                let _ = done.send(v);
            }
        });
        Upkeep { committed, handled }
    }

    /// A version this process committed.
    pub(crate) fn committed(&self, version: u64) {
        self.committed.send_if_modified(|v| {
            let newer = version > *v;
            *v = (*v).max(version);
            newer
        });
    }

    /// Waits until the upkeep has handled every version committed so far.
    pub(crate) async fn settled(&self) {
        let want = *self.committed.borrow();
        let mut handled = self.handled.clone();
        let _ = handled.wait_for(|v| *v >= want).await;
    }
}

/// Writes the checkpoint of `version`; with `vacuum`, first deletes the files whose removal
/// the checkpoint is about to drop (counted there).
///
/// A checkpoint keeps a removal only while `delta.deletedFileRetentionDuration` has not passed
/// since it: the expired ones are dropped from the log's state for good, and a file no
/// removal names any more can only be found by listing the table (a full vacuum). So the
/// removals are acted on here, at the one place every one of them passes once expired: the
/// files they name are deleted (unless a later commit added them back), then the checkpoint
/// drops them. If the deletion fails, no checkpoint is written (the next interval tries both).
async fn checkpoint(
    log: &LogStoreRef,
    version: u64,
    vacuum: Option<&Counter>,
) -> Result<(), DeltaTableError> {
    let mut table = DeltaTable::new(log.clone());
    table.load_version(version).await?;
    if let Some(vacuumed) = vacuum {
        let state = table.snapshot()?;
        let retain = state.table_config().deleted_file_retention_duration();
        let deleted = delete_removed(log, state, retain).await?;
        if deleted > 0 {
            vacuumed.inc_by(deleted as u64);
            tracing::info!(
                deleted,
                version,
                "Deleted data files whose removal passed delta.deletedFileRetentionDuration."
            );
        }
    }
    create_checkpoint(&table, None).await
}

/// Deletes the files that a commit removed (a compaction's) longer than `retain` ago as of
/// `state`, unless they are live again; nothing else, and no listing. Returns how many.
pub(crate) async fn delete_removed(
    log: &LogStoreRef,
    state: &DeltaTableState,
    retain: Duration,
) -> Result<usize, DeltaTableError> {
    use futures::TryStreamExt as _;
    let live: std::collections::HashSet<String> = state
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect();
    let cutoff = chrono::Utc::now().timestamp_millis() - retain.as_millis() as i64;
    let expired: Vec<String> = state
        .all_tombstones(log.as_ref())
        .try_filter_map(|t| {
            let path = t.path().to_string();
            let gone = t.deletion_timestamp().unwrap_or(0) < cutoff && !live.contains(&path);
            futures::future::ready(Ok(gone.then_some(path)))
        })
        .try_collect()
        .await?;
    let store = log.object_store(None);
    for path in &expired {
        let at = object_store::path::Path::parse(path)
            .unwrap_or_else(|_| object_store::path::Path::from(path.as_str()));
        match store.delete(&at).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(expired.len())
}

/// A log entry's version, and whether it is a checkpoint (`None`: not a commit or checkpoint
/// file, such as `_last_checkpoint`).
fn entry(meta: &ObjectMeta) -> Option<(u64, bool)> {
    let name = meta.location.filename()?;
    let (digits, rest) = name.split_at_checked(20)?;
    let version = digits.parse().ok()?;
    if rest == ".json" {
        Some((version, false))
    } else if rest.starts_with(".checkpoint") && rest.ends_with(".parquet") {
        Some((version, true))
    } else {
        None
    }
}

/// Removes the log's commit and checkpoint files older than `cutoff_ms` (Unix ms) and older
/// than the newest checkpoint at or below both `newest` and the oldest retained version. Lists
/// from `from` (the checkpoint the last run kept) to the first retained entry. Returns where
/// the next run starts, and how many files were removed.
pub(crate) async fn cleanup(
    log: &LogStoreRef,
    from: u64,
    newest: u64,
    cutoff_ms: i64,
) -> Result<(u64, usize), DeltaTableError> {
    let store = log.object_store(None);
    let dir = log.log_path();
    let offset = dir.clone().join(format!("{from:020}"));
    // `{v}.checkpoint.parquet` sorts before `{v}.json`, and versions in order.
    let mut listing = store.list_with_offset(Some(dir), &offset);
    let mut seen: Vec<(u64, bool, ObjectMeta)> = Vec::new();
    let mut keep = newest;
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let Some((version, is_checkpoint)) = entry(&meta) else {
            continue;
        };
        if version > keep {
            break;
        }
        if !is_checkpoint && meta.last_modified.timestamp_millis() >= cutoff_ms {
            // The oldest retained version: it, and everything after it, stays.
            keep = version;
            seen.push((version, is_checkpoint, meta));
            break;
        }
        seen.push((version, is_checkpoint, meta));
    }
    drop(listing);
    let Some(safe) = seen
        .iter()
        .filter(|(v, cp, _)| *cp && *v <= keep)
        .map(|(v, _, _)| *v)
        .max()
    else {
        return Ok((from, 0));
    };
    let mut removed = 0;
    for (version, _, meta) in &seen {
        if *version < safe && meta.last_modified.timestamp_millis() <= cutoff_ms {
            match store.delete(&meta.location).await {
                // Another writer's upkeep may have removed it first.
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok((safe, removed))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::TryStreamExt;
    use object_store::ObjectStore;
    use object_store::memory::InMemory;

    use super::*;
    use crate::table::Table;
    use crate::table::tests::{part, table};

    /// The versions of the log's commit files and checkpoints, in order.
    async fn entries(root: &Arc<dyn ObjectStore>) -> (Vec<u64>, Vec<u64>) {
        let dir = object_store::path::Path::from("p/tables/tickets_with_team/_delta_log");
        let mut metas: Vec<ObjectMeta> = root.list(Some(&dir)).try_collect().await.expect("list");
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        let (mut commits, mut checkpoints) = (Vec::new(), Vec::new());
        for (version, cp) in metas.iter().filter_map(entry) {
            if cp {
                checkpoints.push(version)
            } else {
                commits.push(version)
            }
        }
        (commits, checkpoints)
    }

    #[tokio::test]
    async fn expired_entries_go_down_to_the_newest_safe_checkpoint_and_the_table_still_reads() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table(&root).await;
        // Version 0 made the table; checkpoints at 99 and 199 (by the upkeep).
        for v in 1..=250 {
            t.commit(&[part(0, (v > 1).then_some(v - 1), v)])
                .await
                .expect("commit");
        }
        t.settled().await;
        let (commits, checkpoints) = entries(&root).await;
        assert_eq!(checkpoints, vec![99, 199]);
        assert_eq!(
            commits.len(),
            251,
            "the upkeep removed nothing within the retention (30 days)"
        );

        // Nothing expired yet: nothing removed.
        let (from, removed) = cleanup(t.log(), 0, 250, 0).await.expect("cleanup");
        assert_eq!((from, removed), (0, 0));

        // Everything expired: the log keeps what the newest checkpoint needs.
        let future = chrono::Utc::now().timestamp_millis() + 60_000;
        let (from, removed) = cleanup(t.log(), 0, 250, future).await.expect("cleanup");
        assert_eq!(
            (from, removed),
            (199, 199 + 1),
            "commits 0..=198 and checkpoint 99"
        );
        let (commits, checkpoints) = entries(&root).await;
        assert_eq!(checkpoints, vec![199]);
        assert_eq!(commits, (199..=250).collect::<Vec<_>>());
        // Again, from where it stopped: nothing more to remove.
        assert_eq!(
            cleanup(t.log(), from, 250, future).await.expect("cleanup"),
            (199, 0)
        );

        // A new reader loads the table from the checkpoint and finds every version.
        let other = Table::open(root.clone(), "bucket", "p/")
            .await
            .expect("read")
            .expect("a table");
        assert_eq!(other.version().await, 250);
        assert_eq!(other.version_of("tickets", 0).await.expect("v"), Some(250));
        assert_eq!(other.files().await.expect("files").len(), 250);
    }
}
