//! Batch-sized buffers handed back after a batch and reused by a later one.
//!
//! Why: glibc raises its mmap threshold each time a large buffer is freed, so after the first
//! few batches their multi-megabyte buffers come from its heaps, which it gives back to the
//! system only from the top. Allocating them afresh for every batch left tens of MiB of freed
//! memory resident (BENCHMARKS.md, "What 0.5 would take"). Reused, no more are kept than
//! `keep`, and each has the room of the largest batch it held.

use std::sync::Mutex;

/// A buffer that can be emptied for reuse, keeping its room.
pub trait Reusable {
    fn empty(&mut self);
}

impl Reusable for Vec<u8> {
    fn empty(&mut self) {
        self.clear();
    }
}

/// Free buffers of one kind, at most `keep` of them.
pub struct Pool<T> {
    free: Mutex<Vec<T>>,
    keep: usize,
}

impl<T: Reusable> Pool<T> {
    pub const fn new(keep: usize) -> Pool<T> {
        Pool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty buffer given back earlier, if there is one.
    pub fn take(&self) -> Option<T> {
        self.free.lock().ok()?.pop()
    }

    /// Empties `buf` and keeps it for a later [`Pool::take`], or drops it if `keep` are kept
    /// already.
    pub fn give(&self, mut buf: T) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.keep
        {
            buf.empty();
            free.push(buf);
        }
    }
}

/// An empty byte buffer with room for `bytes`: one given back to `pool` if there is one.
pub fn bytes_with_room(pool: &Pool<Vec<u8>>, bytes: usize) -> Vec<u8> {
    let mut buf = pool.take().unwrap_or_default();
    buf.reserve_exact(bytes);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_reused_and_at_most_keep_are_kept() {
        let pool: Pool<Vec<u8>> = Pool::new(1);
        let mut a = bytes_with_room(&pool, 1000);
        a.extend_from_slice(b"old");
        let at = a.as_ptr();
        pool.give(a);
        pool.give(Vec::with_capacity(10));
        let b = bytes_with_room(&pool, 500);
        assert_eq!(b.as_ptr(), at, "the buffer given back first is reused");
        assert!(b.is_empty() && b.capacity() >= 1000);
        assert!(pool.take().is_none(), "only one is kept");
    }
}
