//! How far a library has applied its store's change log, and waiting for it: a read that
//! passes `min_library_seq` (the seq a write returned, on any replica) waits here until this
//! replica has applied that write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The applied seq, readable without a lock, and a condition variable for its waiters.
#[derive(Debug)]
pub(crate) struct SeqWatch {
    applied: AtomicU64,
    lock: Mutex<()>,
    advanced: Condvar,
}

impl SeqWatch {
    pub(crate) fn new(seq: u64) -> Self {
        Self {
            applied: AtomicU64::new(seq),
            lock: Mutex::new(()),
            advanced: Condvar::new(),
        }
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Records that every change up to `seq` is applied and wakes the waiters.
    pub(crate) fn advance(&self, seq: u64) {
        let _l = self.lock.lock();
        self.applied.fetch_max(seq, Ordering::AcqRel);
        self.advanced.notify_all();
    }

    /// Waits until `min` is applied or `deadline` passes; whether it was.
    pub(crate) fn wait_until(&self, min: u64, deadline: Instant) -> bool {
        let mut l = self.lock.lock();
        while self.applied() < min {
            if self.advanced.wait_until(&mut l, deadline).timed_out() {
                return self.applied() >= min;
            }
        }
        true
    }
}

/// Where a replica stands against its store, for health and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationStatus {
    /// `sled` or `postgresql`.
    pub store: &'static str,
    /// Whether other replicas write to the store (the library follows its log).
    pub shared: bool,
    /// The last change applied to this replica's routing state.
    pub applied_seq: u64,
    /// The store's head seq when it was last read (the applied seq for a store nobody else
    /// writes).
    pub head_seq: u64,
    /// Time since the replica last read the store's log successfully; `None` before the first
    /// follow or for an unshared store.
    pub since_caught_up: Option<Duration>,
    /// The last error reading the log, while the store stays unreachable.
    pub last_error: Option<String>,
}

impl ReplicationStatus {
    /// Changes the replica knows of and has not applied.
    pub fn lag(&self) -> u64 {
        self.head_seq.saturating_sub(self.applied_seq)
    }
}

/// The follower's record of its last read of the log.
#[derive(Debug, Default)]
pub(crate) struct FollowState {
    pub(crate) head_seq: u64,
    pub(crate) caught_up_at: Option<Instant>,
    pub(crate) last_error: Option<String>,
}

/// Backoff between failed reads of the log: doubles from 100 ms to 5 s.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_when_the_seq_is_applied_and_time_out_otherwise() {
        let w = std::sync::Arc::new(SeqWatch::new(3));
        assert!(w.wait_until(3, Instant::now()));
        let t0 = Instant::now();
        assert!(!w.wait_until(4, Instant::now() + Duration::from_millis(50)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let w2 = w.clone();
        let h =
            std::thread::spawn(move || w2.wait_until(5, Instant::now() + Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        w.advance(5);
        assert!(h.join().unwrap());
        w.advance(4);
        assert_eq!(w.applied(), 5, "the applied seq never goes back");
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(10), Duration::from_secs(5));
    }
}
