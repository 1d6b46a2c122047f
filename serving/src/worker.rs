//! What the queues' schedulers share: collecting submissions into batches, liveness, and
//! panic messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

/// Turns a stream of submissions (each a request's jobs, never split) into batches: the first
/// submission waiting, then whatever arrives within `wait` while whole submissions fit in
/// `max`; one that does not fit opens the next batch.
pub(crate) struct Batcher<T> {
    rx: mpsc::Receiver<Vec<T>>,
    held: Option<Vec<T>>,
    max: usize,
    wait: Duration,
}

impl<T> Batcher<T> {
    pub fn new(rx: mpsc::Receiver<Vec<T>>, max: usize, wait: Duration) -> Self {
        Self {
            rx,
            held: None,
            max,
            wait,
        }
    }

    /// The next batch; None once every sender is gone and nothing is left.
    pub async fn next(&mut self) -> Option<Vec<T>> {
        let mut jobs = match self.held.take() {
            Some(group) => group,
            None => self.rx.recv().await?,
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        while jobs.len() < self.max {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(group)) if jobs.len() + group.len() <= self.max => jobs.extend(group),
                Ok(Some(group)) => {
                    self.held = Some(group);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        Some(jobs)
    }
}

/// Whether a scheduler task is still running: it holds a [`LivenessGuard`], which marks it
/// dead when dropped (the task ended or panicked).
#[derive(Clone)]
pub(crate) struct Liveness(Arc<AtomicBool>);

impl Liveness {
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
    pub fn guard(&self) -> LivenessGuard {
        LivenessGuard(self.0.clone())
    }
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub(crate) struct LivenessGuard(Arc<AtomicBool>);

impl Drop for LivenessGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The text a panic carried, when it was a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}
