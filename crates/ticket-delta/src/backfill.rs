//! `process-file --output-format delta`: the hour files a run wrote in Parquet, appended to the
//! bucket's table through the stream's own [`TableCommitter`] and [`Retrier`] (one upload and
//! commit path), exactly once per input file.
//!
//! The file's rows are a source of their own in the table: `topic` `file:<name>@<sha256, 12
//! hex>`, partition 0, so its transaction app id is `file:<name>@<sha256>-0`. The hour files,
//! in hour order, are cut into parts of at most [`PART_FILES`] files and [`PART_BYTES`] (an
//! hour file larger than that is a part of its own): the same cut on every run of the same file
//! by the same version (the files' bytes are those of `ENCODING_VERSION`). A part is what the
//! run holds in memory while it commits it. Part `k` is committed with version `k`
//! ([`ticket_commit::drive::backfill`]).
//! A rerun of the same file adds nothing; a run stopped between two parts and started again
//! adds exactly the rest; a changed file is another backfill. A part's files are uploaded
//! before its commit under unique names: a part whose commit never came leaves them unread,
//! and `compact`'s vacuum deletes them once older than its retention. Nothing here fences a
//! running processor: a backfill's app id is its own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use ticket_commit::drive;
use ticket_commit::retry::{BucketCheck, RetryMetrics};
use ticket_commit::{Batch, Failure, Object, Retrier};
use ticket_core::keys::Hour;
use tokio_util::sync::CancellationToken;

use crate::{Creation, GroupCommit, TABLE_DIR, Table, TableCheck, TableCommitter, TableSink};

/// Hour files per commit at most: a log entry of that many adds stays far below 10 MB.
pub const PART_FILES: usize = 256;
/// Bytes of hour files per commit at most (unless one file is larger): held in memory while
/// the part is uploaded and committed.
pub const PART_BYTES: u64 = 64 << 20;

/// What [`into_table`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLoad {
    /// The `topic` the file's rows have in the table: `file:<name>@<sha256, 12 hex>`.
    pub topic: String,
    /// Parts (commits) of the file, and how many of them this run committed.
    pub parts: i64,
    pub committed: i64,
    /// Data files and tickets this run added.
    pub files: usize,
    pub tickets: u64,
}

impl TableLoad {
    /// Every part was in the table before this run: nothing was added.
    pub fn already(&self) -> bool {
        self.committed == 0 && self.parts > 0
    }
}

/// Appends `files` (Parquet, one per hour, from `input`'s run of process-file) to the table of
/// the bucket `s3` names (`{S3_PREFIX}tables/tickets_with_team/`, where the stream's
/// `OUTPUT_FORMAT=delta` writes), exactly once per input file (see the module's documentation).
pub async fn into_table(
    input: &Path,
    mut files: Vec<(PathBuf, Hour)>,
    s3: &ticket_s3::S3Args,
    creation: &Creation,
) -> anyhow::Result<TableLoad> {
    let topic = source_topic(input)?;
    let s3_store = ticket_s3::Store::connect(s3).await?;
    s3_store.check_reachable().await?;
    let store: ticket_s3::store::SharedStore = Arc::new(s3_store);
    let prefix = ticket_core::keys::Layout::new(&s3.prefix, "")
        .prefix()
        .to_string();
    let root = ticket_s3::object_store(s3, ticket_s3::Retries::Caller).await?;
    // The stream's retries: an outage is waited out (Ctrl-C stops the run; the rerun adds
    // the rest), a refusal stops with what to fix.
    let bucket = Retrier::new(CancellationToken::new(), RetryMetrics::default())
        .with_check(Arc::new(BucketCheck::new(store.clone(), &prefix)));
    let table = bucket
        .run("open the Delta table", || {
            Table::open_or_create(root.clone(), &s3.bucket, &prefix, creation, true)
        })
        .await
        .map_err(anyhow::Error::from)?;
    let table = Arc::new(table);
    let sink = TableSink {
        group: GroupCommit::spawn(table.clone()),
        table: table.clone(),
        root: format!("{prefix}{TABLE_DIR}"),
        topic: topic.clone(),
        counted: Default::default(),
        replaced: Default::default(),
        maintainer: None,
    };
    let retry = bucket.with_check(Arc::new(TableCheck {
        bucket: BucketCheck::new(store.clone(), &prefix),
        table,
    }));
    let mut committer = TableCommitter::new(sink, store, 0, retry);

    files.sort_by_key(|(_, hour)| *hour);
    let parts = cut(&files)?;
    let mut load = TableLoad {
        topic,
        parts: parts.len() as i64,
        committed: 0,
        files: 0,
        tickets: 0,
    };
    let (mut added_files, mut added_tickets) = (0, 0);
    let committed = drive::backfill(&mut committer, load.parts, |k| {
        let part = parts[k as usize];
        let made = read_part(part);
        if let Ok(batch) = &made {
            added_files += batch.objects.len();
            added_tickets += batch.valid;
        }
        std::future::ready(made.map_err(Failure::Fatal))
    })
    .await
    .map_err(anyhow::Error::from)
    .context("appending to the Delta table")?;
    load.committed = committed;
    load.files = added_files;
    load.tickets = added_tickets;
    Ok(load)
}

/// The hour files (in hour order) cut into parts: a new part at [`PART_FILES`] files, or when
/// the next file would take the part past [`PART_BYTES`].
fn cut(files: &[(PathBuf, Hour)]) -> anyhow::Result<Vec<&[(PathBuf, Hour)]>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (path, _)) in files.iter().enumerate() {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if i > start && (i - start == PART_FILES || bytes + size > PART_BYTES) {
            parts.push(&files[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < files.len() {
        parts.push(&files[start..]);
    }
    Ok(parts)
}

/// The file's source name in the table: its name and the start of its SHA-256.
fn source_topic(input: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let read_error = || format!("cannot read {}", input.display());
    let mut f = std::fs::File::open(input).with_context(read_error)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    let name = input
        .file_name()
        .map_or_else(|| "-".to_string(), |n| n.to_string_lossy().into_owned());
    Ok(format!("file:{name}@{}", &digest[..12]))
}

/// One part: its hour files read, as a batch of one object per hour (no Kafka offsets: a
/// file's rows have none).
fn read_part(part: &[(PathBuf, Hour)]) -> anyhow::Result<Batch> {
    let mut batch = Batch {
        extension: "parquet",
        ..Batch::default()
    };
    for (path, hour) in part {
        let body = Bytes::from(
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        let rows = datafusion::parquet::file::reader::SerializedFileReader::new(body.clone())
            .map(|r| {
                use datafusion::parquet::file::reader::FileReader;
                r.metadata().file_metadata().num_rows()
            })
            .with_context(|| format!("{} is not a Parquet file", path.display()))?;
        batch.valid += rows as u64;
        batch.objects.push(Object {
            hour: *hour,
            first: -1,
            last: -1,
            tickets: rows as u64,
            body,
        });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hour files of these sizes (sparse: nothing is written), one hour each, in order.
    fn files(dir: &Path, sizes: &[u64]) -> Vec<(PathBuf, Hour)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let path = dir.join(format!("{i}.parquet"));
                std::fs::File::create(&path)
                    .and_then(|f| f.set_len(*size))
                    .expect("a file");
                (path, Hour::from_millis(i as i64 * 3_600_000))
            })
            .collect()
    }

    fn lengths(parts: &[&[(PathBuf, Hour)]]) -> Vec<usize> {
        parts.iter().map(|p| p.len()).collect()
    }

    #[test]
    fn parts_end_at_256_files_or_64_mib_and_a_larger_file_is_a_part_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = files(&dir.path().join("small"), &[]);
        assert!(cut(&small).expect("cut").is_empty());
        std::fs::create_dir(dir.path().join("many")).expect("dir");
        let many = files(&dir.path().join("many"), &[1_000; 600]);
        assert_eq!(lengths(&cut(&many).expect("cut")), [256, 256, 88]);
        std::fs::create_dir(dir.path().join("big")).expect("dir");
        let mib = 1 << 20;
        let big = files(
            &dir.path().join("big"),
            &[40 * mib, 24 * mib, mib, 100 * mib, 10 * mib],
        );
        assert_eq!(lengths(&cut(&big).expect("cut")), [2, 1, 1, 1]);
        // The same files cut again: the same parts.
        assert_eq!(lengths(&cut(&big).expect("cut")), [2, 1, 1, 1]);
    }
}
