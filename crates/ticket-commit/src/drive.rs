//! The driver: how batches go through a [`Committer`], the same for the stream's writers and
//! for backfills.

use crate::{Batch, Committer, Failure, Plan};

/// One batch of the stream: committed, or (`rebuild`: a committed range read again from
/// Kafka, [`Plan::Rebuild`]) checked against its record and completed.
pub async fn write(
    committer: &mut dyn Committer,
    batch: Batch,
    rebuild: bool,
) -> Result<(), Failure> {
    if rebuild {
        committer.complete(batch).await
    } else {
        committer.commit(batch).await
    }
}

/// A backfill: a source cut into parts `0..parts` the same way on every run, part `k`
/// committed as the batch of offsets `k..=k`, so that the output's version of the source is
/// the number of the last part committed (`version + 1` parts are in). Recovers first and commits only the parts after what is
/// there: a rerun adds nothing, a run killed between two parts and started again adds exactly
/// the rest. `part(k)` makes part `k` when it is its turn (one in memory at a time). Returns
/// how many parts this run committed.
pub async fn backfill<F, Fut>(
    committer: &mut dyn Committer,
    parts: i64,
    mut part: F,
) -> Result<i64, Failure>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<Batch, Failure>>,
{
    let from = match committer.recover().await? {
        Plan::Resume { at } => at,
        Plan::Rebuild { first, last } => {
            return Err(Failure::Fatal(anyhow::anyhow!(
                "the output asks for parts {first}..={last} to be rebuilt: a backfill's parts are never recorded before they are written"
            )));
        }
    };
    let mut committed = 0;
    for k in from.max(0)..parts {
        let mut batch = part(k).await?;
        (batch.first, batch.last) = (k, k);
        committer.commit(batch).await?;
        committed += 1;
    }
    Ok(committed)
}
