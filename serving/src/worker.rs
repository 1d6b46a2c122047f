//! Liveness of the queues' schedulers, and panic messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
