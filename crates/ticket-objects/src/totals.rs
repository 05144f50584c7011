//! The object layout's totals: the sum of every partition's checkpoint.

use anyhow::anyhow;
use futures::future::BoxFuture;
use ticket_commit::{Failure, Retrier, Totals};
use ticket_core::checkpoint::Checkpoint;
use ticket_core::counts::Counts;
use ticket_core::keys::Layout;
use ticket_s3::store::SharedStore;

/// Sums every partition's checkpoint: the totals over everything under `tickets_with_team/`.
pub async fn total_counts(
    store: &SharedStore,
    layout: &Layout,
    retry: &Retrier,
) -> Result<Counts, Failure> {
    let prefix = layout.checkpoints_prefix();
    let keys = retry
        .run("list checkpoints", || store.list(&prefix))
        .await?;
    let mut total = Counts::default();
    for key in keys
        .iter()
        .filter(|k| layout.partition_of_checkpoint(k).is_some())
    {
        if let Some((bytes, _)) = retry.run("read checkpoint", || store.get(key)).await? {
            let cp = Checkpoint::from_json(&bytes)
                .map_err(|e| anyhow!("checkpoint {key} is not valid: {e}"))?;
            total.merge(&cp.counts());
        }
    }
    Ok(total)
}

/// [`Totals`] of the object layout: [`total_counts`].
pub struct CheckpointTotals {
    pub store: SharedStore,
    pub layout: Layout,
}

impl Totals for CheckpointTotals {
    fn total<'a>(&'a mut self, retry: &'a Retrier) -> BoxFuture<'a, Result<Counts, Failure>> {
        Box::pin(total_counts(&self.store, &self.layout, retry))
    }
}
