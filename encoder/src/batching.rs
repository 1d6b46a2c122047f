//! [`BatchingEncoder`]: one worker thread for all encoder work, merging concurrent requests.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use roe_expert_library::embedding::Encoder;
use roe_expert_library::{LibraryError, Result};

/// Serialises encoder work through one thread and merges concurrent requests into shared
/// batches. Concurrent Route calls would otherwise each start a full forward pass with its
/// own thread pool and oversubscribe the cores; here they queue, and whatever is waiting when
/// the worker frees up goes through together (up to `max_batch_texts`). A panic inside the
/// model fails the requests of its batch, not the worker; should the worker end anyway,
/// [`Encoder::is_healthy`] says so and requests fail at once.
pub struct BatchingEncoder {
    id: String,
    dim: usize,
    queue: parking_lot::Mutex<mpsc::Sender<EmbedJob>>,
    alive: Arc<AtomicBool>,
}

type EmbedJob = (Vec<String>, mpsc::Sender<Result<Vec<Vec<f32>>>>);

/// Marks the worker dead when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl BatchingEncoder {
    pub fn new(inner: Arc<dyn Encoder>, max_batch_texts: usize) -> Self {
        let (tx, rx) = mpsc::channel::<EmbedJob>();
        let id = inner.id().to_string();
        let dim = inner.dim();
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let spawned = std::thread::Builder::new()
            .name("roe-encoder".into())
            .spawn(move || {
                let _guard = guard;
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    let mut texts: usize = jobs[0].0.len();
                    while texts < max_batch_texts {
                        match rx.try_recv() {
                            Ok(job) => {
                                texts += job.0.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    run_batch(&*inner, jobs);
                }
            });
        if let Err(e) = spawned {
            // The guard went down with the closure: the encoder reports itself unhealthy.
            tracing::error!(error = %e, "could not start the encoder thread");
        }
        Self {
            id,
            dim,
            queue: parking_lot::Mutex::new(tx),
            alive,
        }
    }
}

/// Embeds every job's texts in one pass and hands each job its rows; a failure (or a panic)
/// reaches every job of the batch.
fn run_batch(inner: &dyn Encoder, jobs: Vec<EmbedJob>) {
    let all: Vec<String> = jobs.iter().flat_map(|(t, _)| t.iter().cloned()).collect();
    crate::metrics::batch(all.len());
    let embedded = std::panic::catch_unwind(AssertUnwindSafe(|| inner.embed(&all)))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %why, "the encoder panicked");
            Err(LibraryError::Encoder(format!("the encoder failed: {why}")))
        })
        .and_then(|v| {
            if v.len() == all.len() {
                Ok(v)
            } else {
                Err(LibraryError::Encoder(format!(
                    "the encoder returned {} vectors for {} texts",
                    v.len(),
                    all.len()
                )))
            }
        });
    match embedded {
        Ok(mut vectors) => {
            for (t, reply) in jobs.into_iter().rev() {
                let mine = vectors.split_off(vectors.len() - t.len());
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            for (_, reply) in jobs {
                let _ = reply.send(Err(LibraryError::Encoder(e.to_string())));
            }
        }
    }
}

impl Encoder for BatchingEncoder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let stopped = || LibraryError::Encoder("the encoder worker has stopped".into());
        let (tx, rx) = mpsc::channel();
        self.queue
            .lock()
            .send((texts.to_vec(), tx))
            .map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())?
    }

    fn is_healthy(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Embeds a text as [len, 1] normalised; panics on "panic".
    struct Fake;

    impl Encoder for Fake {
        fn id(&self) -> &str {
            "fake"
        }
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
            if texts.iter().any(|t| t == "panic") {
                panic!("fake encoder panic");
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect())
        }
    }

    #[test]
    fn a_panic_fails_its_batch_and_the_worker_goes_on() {
        let enc = BatchingEncoder::new(Arc::new(Fake), 64);
        let e = enc.embed(&["panic".to_string()]).unwrap_err();
        assert!(e.to_string().contains("fake encoder panic"), "{e}");
        assert!(enc.is_healthy());
        let v = enc.embed(&["abc".to_string(), "a".to_string()]).unwrap();
        assert_eq!(v, vec![vec![3.0, 1.0], vec![1.0, 1.0]]);
    }
}
