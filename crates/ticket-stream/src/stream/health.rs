//! Whether the processor is ready (connected, checks passed) and alive (its loop turns), as
//! `/health/ready` and `/health/live` report it. Next to the loop whose constants it is
//! checked against; on the monotonic clock, so that a jump of the wall clock (NTP, a
//! suspended VM's catch-up) never makes a live loop look stuck.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::TICK;

/// The processing loop ticks every [`TICK`] and waits on nothing (not on S3, which its
/// writers' tasks wait on; not on the broker: seeks are asynchronous, partitions are paused);
/// this long without a tick means it is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(120);
const _: () = assert!(STUCK_AFTER.as_millis() > 100 * TICK.as_millis());

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Milliseconds since [`origin`] at the last tick, plus one (0: never ticked).
    last_tick: AtomicU64,
}

/// The instant monotonic times are counted from (the first use).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn since_origin_ms(now: Instant) -> u64 {
    now.saturating_duration_since(origin()).as_millis() as u64 + 1
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.tick();
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn tick(&self) {
        self.last_tick
            .store(since_origin_ms(Instant::now()), Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        self.is_live_at(Instant::now())
    }

    fn is_live_at(&self, now: Instant) -> bool {
        let last = self.last_tick.load(Ordering::Relaxed);
        last == 0 || since_origin_ms(now).saturating_sub(last) < STUCK_AFTER.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_until_the_loop_has_not_ticked_for_stuck_after() {
        let h = Health::default();
        assert!(h.is_live(), "live before the first tick");
        h.tick();
        let now = Instant::now();
        assert!(h.is_live_at(now + STUCK_AFTER - Duration::from_secs(1)));
        assert!(!h.is_live_at(now + STUCK_AFTER + Duration::from_secs(1)));
        h.tick();
        assert!(h.is_live());
    }
}
