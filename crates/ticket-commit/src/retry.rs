//! Retrying S3 requests: the one retry policy of the processor (jitter, a cap, and the stop
//! deadline as the only end). The S3 SDK makes each request once and `object_store` (the Delta
//! log) retries nothing either (`ticket_s3::object_store`), so the layers never stack.
//!
//! What is worth retrying is not read off how a library wraps an error. A failure the adapter
//! calls transient (network, timeout, 5xx) is retried. Any other failure is checked against the
//! store itself before it may stop the processor: [`Retrier::check`] reads the bucket (and the
//! table) again, fresh. If that check cannot reach S3 either, the failure was the outage and is
//! retried; if the check is refused (credentials, a missing bucket, a table this processor
//! cannot write), that is what stops the processor, with what to fix. A failure that the check
//! cannot explain (S3 answers, the bucket and the table look fine) is retried
//! [`UNEXPLAINED_LIMIT`] times in a row before it stops the processor: a real fault of ours
//! should not loop forever, and a flapping network does not make a request fail and its check
//! pass that many times in a row.
//!
//! Whether S3 is reachable is kept in [`RetryMetrics::s3_unreachable_since`]: the log has one line
//! when S3 goes away and one when it is back, `/health/ready` and the metric say since when.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use futures::future::BoxFuture;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::Failure;
use ticket_s3::store::{Expect, SharedStore, StoreError};

/// What the retries report, as the processor's Prometheus metrics (registered by its
/// `Metrics`; shared handles, cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct RetryMetrics {
    /// S3 requests that failed (each attempt).
    pub s3_errors: Counter,
    /// Unix time (s) since which S3 has failed every request; 0 while it answers.
    pub s3_unreachable_since: Gauge<i64, AtomicI64>,
}

/// Failures in a row that S3 answered a fresh check for, before one stops the processor.
pub const UNEXPLAINED_LIMIT: u32 = 8;

/// A fresh look at the store after a failure that was not plainly transient: `Ok` if it is
/// fine, a transient error if it cannot be reached, a permanent one if it refuses us.
pub trait Check: Send + Sync + 'static {
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// What it looks at, for messages ("the bucket").
    fn what(&self) -> &'static str;
}

/// The bucket: it exists, answers us, and lets us write and delete under the prefix (what
/// `ticket_s3::Store::check_writable` checks at start, over the store interface).
pub struct BucketCheck {
    pub store: SharedStore,
    /// A key under the processor's prefix, written and deleted by the check.
    pub probe: String,
}

impl BucketCheck {
    pub fn new(store: SharedStore, prefix: &str) -> BucketCheck {
        BucketCheck {
            store,
            probe: format!("{prefix}_checkpoints/.write-check-{}", uuid::Uuid::new_v4()),
        }
    }
}

impl Check for BucketCheck {
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // A missing bucket, refused credentials or a missing permission fail the write
            // or the delete (the S3 adapter says which, and what to fix).
            self.store
                .put(&self.probe, bytes::Bytes::from_static(b"ok"), Expect::Any)
                .await?;
            self.store.delete(&self.probe).await
        })
    }

    fn what(&self) -> &'static str {
        "the bucket"
    }
}

/// Retries S3 operations that failed transiently, with capped exponential backoff and full
/// jitter (each wait is random between half the backoff and the backoff, so partitions that
/// failed together, as in an outage, do not retry in lockstep), until they succeed or `abort`
/// fires. A failure that a fresh check shows will not go away (403, missing bucket, a table
/// this processor cannot write) stops at once with what to fix: retrying it would only hide it.
#[derive(Clone)]
pub struct Retrier {
    pub abort: CancellationToken,
    pub metrics: RetryMetrics,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Judges a failure that is not plainly transient; without one, such a failure is fatal.
    pub check: Option<Arc<dyn Check>>,
    /// Unix time (ms) of the failure that found S3 unreachable; 0 while it answers. Shared by
    /// every clone: one outage, one line each way.
    down_since: Arc<AtomicU64>,
}

/// Unix time in milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// What a fresh check made of a failure.
enum Verdict {
    /// The check could not reach S3 either: an outage.
    Outage,
    /// The check was refused: this is what to fix.
    Refused(StoreError),
    /// S3 answered the check and found nothing wrong.
    Unexplained,
}

impl Retrier {
    pub fn new(abort: CancellationToken, metrics: RetryMetrics) -> Retrier {
        Retrier {
            abort,
            metrics,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            check: None,
            down_since: Arc::default(),
        }
    }

    /// The same policy, judging failures with `check`.
    pub fn with_check(self, check: Arc<dyn Check>) -> Retrier {
        Retrier {
            check: Some(check),
            ..self
        }
    }

    /// The same policy, waiting `first` after the first failure and at most `max`.
    pub fn with_backoff(self, first: Duration, max: Duration) -> Retrier {
        Retrier {
            first_backoff: first,
            max_backoff: max,
            ..self
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

    async fn verdict(&self, e: &StoreError) -> Verdict {
        let Some(check) = &self.check else {
            return Verdict::Refused(e.clone());
        };
        match check.check().await {
            Ok(()) => Verdict::Unexplained,
            Err(c) if c.is_transient() => Verdict::Outage,
            Err(c) => Verdict::Refused(c),
        }
    }

    /// S3 failed a request: the first failure since it was last reachable is logged.
    fn unreachable(&self, what: &str, e: &StoreError) {
        let now = now_ms();
        if self
            .down_since
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.metrics.s3_unreachable_since.set((now / 1000) as i64);
            tracing::warn!(what, error = %e, "S3 is unreachable; retrying until it is back (nothing is lost meanwhile).");
        }
    }

    /// A request that was sent at `sent` (Unix ms) succeeded: if S3 was unreachable, it is
    /// back (logged once). Not if the request was sent before the failure that found S3
    /// gone: an answer already on its way at the cut says nothing about S3 now.
    fn reachable(&self, sent: u64) {
        let since = self.down_since.load(Ordering::SeqCst);
        if since == 0
            || sent <= since
            || self
                .down_since
                .compare_exchange(since, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        self.metrics.s3_unreachable_since.set(0);
        tracing::info!(
            unreachable_seconds = now_ms().saturating_sub(since) / 1000,
            "S3 is reachable again."
        );
    }

    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1u32;
        let mut unexplained = 0u32;
        loop {
            let sent = now_ms();
            let e = match op().await {
                Ok(v) => {
                    self.reachable(sent);
                    return Ok(v);
                }
                Err(StoreError::Conflict { key }) => {
                    return Err(Failure::Fatal(anyhow!("unexpected conflict on {key}")));
                }
                Err(e) => e,
            };
            self.metrics.s3_errors.inc();
            if e.is_transient() {
                unexplained = 0;
                self.unreachable(what, &e);
            } else {
                match self.verdict(&e).await {
                    Verdict::Outage => {
                        unexplained = 0;
                        self.unreachable(what, &e);
                    }
                    Verdict::Refused(why) => {
                        return Err(Failure::Fatal(anyhow!("{what}: {why}")));
                    }
                    Verdict::Unexplained => {
                        unexplained += 1;
                        if unexplained >= UNEXPLAINED_LIMIT {
                            return Err(Failure::Fatal(anyhow!(
                                "{what}: {e} ({unexplained} times in a row, while S3 answered and {} checked out each time)",
                                self.check.as_ref().map_or("the store", |c| c.what())
                            )));
                        }
                        tracing::warn!(what, attempt, error = %e, "S3 request failed though the store checks out; retrying.");
                    }
                }
            }
            let wait = self.wait_before_next(attempt);
            tracing::debug!(what, attempt, retry_in_ms = wait.as_millis() as u64, error = %e, "S3 request failed; retrying.");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.abort.cancelled() => return Err(Failure::Aborted),
            }
            attempt += 1;
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
    use std::sync::Mutex;

    #[test]
    fn waits_grow_to_the_cap_and_differ_between_retriers() {
        let r = Retrier::new(CancellationToken::new(), RetryMetrics::default());
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

    /// A check that answers what it is told.
    struct Scripted(Mutex<Vec<Result<(), StoreError>>>);

    impl Check for Scripted {
        fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
            let next = self
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or(Ok(()));
            Box::pin(async move { next })
        }

        fn what(&self) -> &'static str {
            "the scripted store"
        }
    }

    fn transient() -> StoreError {
        StoreError::Transient {
            op: "GET",
            location: "s3://b/k".into(),
            message: "connection refused".into(),
        }
    }

    fn refused(hint: &str) -> StoreError {
        StoreError::Permanent {
            op: "GET",
            location: "s3://b/k".into(),
            message: "Generic error wrapped in another".into(),
            hint: hint.into(),
        }
    }

    fn quick(check: Vec<Result<(), StoreError>>) -> Retrier {
        Retrier {
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            ..Retrier::new(CancellationToken::new(), RetryMetrics::default())
        }
        .with_check(Arc::new(Scripted(Mutex::new(check))))
    }

    /// Runs `r` on an operation that fails with `errors` in turn, then succeeds.
    async fn fails_then_works(r: &Retrier, errors: Vec<StoreError>) -> Result<u32, Failure> {
        let calls = Mutex::new(errors.into_iter());
        r.run("op", || {
            let next = calls.lock().unwrap_or_else(|p| p.into_inner()).next();
            async move {
                match next {
                    Some(e) => Err(e),
                    None => Ok(7),
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_failure_the_library_calls_permanent_is_retried_while_s3_is_unreachable() {
        // The wrapped error looks permanent, but the fresh check cannot reach S3 either.
        let r = quick(vec![Err(transient()), Err(transient())]);
        let got = fails_then_works(&r, vec![refused("table?"), refused("table?")]).await;
        assert_eq!(got.ok(), Some(7));
        assert_eq!(r.metrics.s3_unreachable_since.get(), 0, "reachable again");
    }

    #[test]
    fn an_answer_sent_before_the_cut_does_not_say_s3_is_back() {
        let r = Retrier::new(CancellationToken::new(), RetryMetrics::default());
        let before = now_ms() - 10;
        r.unreachable("op", &transient());
        assert!(r.metrics.s3_unreachable_since.get() > 0);
        r.reachable(before);
        assert!(
            r.metrics.s3_unreachable_since.get() > 0,
            "a request sent before the failure answered: still unreachable"
        );
        std::thread::sleep(Duration::from_millis(2));
        r.reachable(now_ms());
        assert_eq!(r.metrics.s3_unreachable_since.get(), 0, "back");
    }

    #[tokio::test]
    async fn a_refused_check_stops_with_what_to_fix() {
        let r = quick(vec![Err(refused("check the AWS credentials"))]);
        let got = fails_then_works(&r, vec![refused("?")]).await;
        let Err(Failure::Fatal(e)) = got else {
            panic!("not fatal: {got:?}");
        };
        assert!(e.to_string().contains("check the AWS credentials"), "{e}");
    }

    #[tokio::test]
    async fn an_unexplained_failure_is_retried_a_bounded_number_of_times() {
        let r = quick(vec![]);
        let few = vec![refused("?"); UNEXPLAINED_LIMIT as usize - 1];
        assert_eq!(fails_then_works(&r, few).await.ok(), Some(7));
        let many = vec![refused("?"); UNEXPLAINED_LIMIT as usize];
        assert!(matches!(
            fails_then_works(&r, many).await,
            Err(Failure::Fatal(_))
        ));
    }

    #[tokio::test]
    async fn the_outage_is_marked_while_it_lasts_and_a_stop_ends_the_retries() {
        let r = quick(vec![]);
        let abort = r.abort.clone();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let run = r.run("op", || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(transient()) }
        });
        let watch = async {
            while attempts.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(r.metrics.s3_unreachable_since.get() > 0);
            abort.cancel();
        };
        let (got, ()) = tokio::join!(run, watch);
        assert!(matches!(got, Err(Failure::Aborted)), "{got:?}");
    }
}
