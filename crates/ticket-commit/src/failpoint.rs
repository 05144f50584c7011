//! Fault points for the reliability tests (`tests/e2e/faults.rs`).

/// In debug builds only:
/// `TICKET_PROCESSOR_FAILPOINT=<point>:<action>:<n>` makes the n-th pass through `<point>`
/// (`before-checkpoint`, `after-checkpoint`, `after-final`; with the Delta table
/// `before-table-commit`, `after-table-commit`) either `abort` the process (as a SIGKILL
/// would) or `pause-<ms>` it (as a GC pause or a frozen VM would, long enough to lose the
/// partition); any other action is the caller's (true is returned: `lose` at
/// `after-table-commit` drops the commit's answer). Its log line names the partition it
/// stopped in. Release builds compile it to nothing.
#[cfg(debug_assertions)]
pub async fn failpoint(point: &str, partition: i32) -> bool {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SPEC: OnceLock<Option<(String, String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("TICKET_PROCESSOR_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        let (p, a, n) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
        Some((p.to_string(), a.to_string(), n))
    });
    let Some((p, action, n)) = spec else {
        return false;
    };
    if p != point || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return false;
    }
    tracing::warn!(point, action, partition, "Failpoint reached.");
    if action == "abort" {
        std::process::abort();
    }
    if let Some(ms) = action.strip_prefix("pause-").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    true
}

#[cfg(not(debug_assertions))]
pub async fn failpoint(_point: &str, _partition: i32) -> bool {
    false
}
