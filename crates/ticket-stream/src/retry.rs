//! Retrying S3 requests. Whether an error is worth retrying is decided in one place,
//! [`StoreError::is_transient`] (the S3 adapter classifies each answer); this module only
//! decides when to try again.

use std::time::Duration;

use anyhow::anyhow;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sink::Failure;
use ticket_s3::store::StoreError;

/// Retries S3 operations that failed transiently, with capped exponential backoff and full
/// jitter (each wait is random between half the backoff and the backoff, so partitions that
/// failed together, as in an outage, do not retry in lockstep), until they succeed or `abort`
/// fires. A permanent error (403, missing bucket) stops at once with what to fix: retrying it
/// would only hide it.
#[derive(Clone)]
pub struct Retrier {
    pub abort: CancellationToken,
    pub metrics: Metrics,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Retrier {
    pub fn new(abort: CancellationToken, metrics: Metrics) -> Retrier {
        Retrier {
            abort,
            metrics,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// How long to wait before attempt `attempt + 1` (from 1): jittered, never above the cap.
    pub fn wait_before_next(&self, attempt: u32) -> Duration {
        let backoff = self
            .first_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff);
        backoff.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => {
                    if attempt > 1 {
                        tracing::info!(what, attempt, "S3 is reachable again.");
                    }
                    return Ok(v);
                }
                Err(e) if e.is_transient() => {
                    self.metrics.s3_errors.inc();
                    let wait = self.wait_before_next(attempt);
                    tracing::warn!(what, attempt, retry_in_ms = wait.as_millis() as u64, error = %e, "S3 request failed; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.abort.cancelled() => return Err(Failure::Aborted),
                    }
                    attempt += 1;
                }
                Err(StoreError::Conflict { key }) => {
                    return Err(Failure::Fatal(anyhow!("unexpected conflict on {key}")));
                }
                Err(e) => {
                    self.metrics.s3_errors.inc();
                    return Err(Failure::Fatal(anyhow!("{what}: {e}")));
                }
            }
        }
    }

    /// Like [`Retrier::run`], but a lost conditional write is reported as `Ok(None)`.
    pub async fn run_conditional<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<Option<T>, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.run(what, || {
            let fut = op();
            async move {
                match fut.await {
                    Ok(v) => Ok(Some(v)),
                    Err(StoreError::Conflict { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_differ_between_retriers() {
        let r = Retrier::new(CancellationToken::new(), Metrics::new());
        for attempt in 1..40 {
            let cap = (r.first_backoff * 2u32.pow((attempt - 1).min(16))).min(r.max_backoff);
            let w = r.wait_before_next(attempt);
            assert!(
                w <= cap && w >= cap / 2,
                "attempt {attempt}: {w:?} vs {cap:?}"
            );
        }
        // Jitter: ten partitions failing together do not all wait the same.
        let waits: std::collections::BTreeSet<Duration> =
            (0..10).map(|_| r.wait_before_next(5)).collect();
        assert!(waits.len() > 1, "{waits:?}");
    }
}
