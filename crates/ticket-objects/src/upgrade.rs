//! Upgrades from versions up to 0.1.0, which staged each object and wrote `pending:
//! {staging_key, final_key}` into the checkpoint (the crate's documentation, "Upgrades").

use anyhow::anyhow;
use ticket_commit::{Failure, Retrier};
use ticket_core::checkpoint::Pending;
use ticket_s3::store::SharedStore;

/// Copies a pending object to its final key. Another owner finishing the same checkpoint
/// (a rebalance) may have copied it and deleted the staging object in between: then the copy
/// fails, the final object is there, and that is success, not a reason to stop.
async fn copy_pending(store: &SharedStore, p: &Pending, retry: &Retrier) -> Result<(), Failure> {
    let copied = retry
        .run("copy tickets object", || {
            store.copy(&p.staging_key, &p.final_key)
        })
        .await;
    match copied {
        Err(Failure::Fatal(e)) => {
            if retry
                .run("check tickets object", || store.exists(&p.final_key))
                .await?
            {
                tracing::info!(key = %p.final_key, "Another owner finished this object first.");
                Ok(())
            } else {
                Err(Failure::Fatal(e))
            }
        }
        other => other,
    }
}

/// Completes a batch whose checkpoint is durable: the final object gets the staged bytes.
pub(crate) async fn finish_pending(
    store: &SharedStore,
    p: &Pending,
    retry: &Retrier,
) -> Result<(), Failure> {
    let final_exists = || retry.run("check tickets object", || store.exists(&p.final_key));
    if !final_exists().await? {
        if !retry
            .run("check staging object", || store.exists(&p.staging_key))
            .await?
        {
            // Another process may have finished it between our two reads.
            if final_exists().await? {
                return Ok(());
            }
            return Err(Failure::Fatal(anyhow!(
                "checkpoint says {} is pending from {}, but neither object exists in {}: was the bucket edited by hand?",
                p.final_key,
                p.staging_key,
                store.location()
            )));
        }
        tracing::info!(key = %p.final_key, "Finishing a batch a previous run left pending.");
        copy_pending(store, p, retry).await?;
    }
    retry
        .run("delete staging object", || store.delete(&p.staging_key))
        .await
}
