//! `min_library_seq`: read-your-writes across replicas over one shared library store. Every
//! write returns the seq of the library's change log it committed at; a read that passes it
//! waits until this replica has applied that seq, at most the server's `--min-seq-wait-ms`
//! ([`ServeOptions::min_seq_wait`](crate::server::ServeOptions::min_seq_wait)) and the call's
//! deadline, and is UNAVAILABLE naming both seqs past that. A process without a library of its
//! own (`--role inference`) does not wait: it passes the seq on to the library process with
//! the reads it makes there ([`forwarded`], read by [`crate::remote`]), which waits.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use roe_expert_library::library::ExpertLibrary;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::library_service::blocking;
use crate::status::min_seq_status;

/// How long a read waits for its `min_library_seq` by default (`--min-seq-wait-ms`).
pub const DEFAULT_MIN_SEQ_WAIT: Duration = Duration::from_secs(2);

tokio::task_local! {
    /// The `min_library_seq` of the request this task serves, for the remote reads it makes.
    static MIN_LIBRARY_SEQ: u64;
}

/// Waits until `library` has applied seq `min` (0: no wait), at most `wait`, on a blocking
/// thread; UNAVAILABLE naming both seqs after that. Returns at once when the seq is applied.
pub async fn wait_for_seq(
    library: &Arc<ExpertLibrary>,
    min: u64,
    wait: Duration,
) -> Result<(), Status> {
    if min == 0 || library.library_seq() >= min {
        return Ok(());
    }
    let library = library.clone();
    blocking(move || library.wait_for_seq(min, wait).map_err(min_seq_status)).await
}

/// The `min_library_seq` of the request the current task serves (0 outside one): what a
/// remote library or router call passes on.
pub fn forwarded() -> u64 {
    MIN_LIBRARY_SEQ.try_with(|seq| *seq).unwrap_or(0)
}

/// The time left to a call, from the `grpc-timeout` its client sent (None: no deadline).
pub fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    // At most 8 digits and one unit (the gRPC HTTP/2 protocol).
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a read may wait for its seq: the server's bound, and a little less than the
/// call's deadline, so that the caller hears UNAVAILABLE naming the seqs rather than
/// DEADLINE_EXCEEDED.
fn bounded(wait: Duration, deadline: Option<Duration>) -> Duration {
    match deadline {
        Some(d) => wait.min(d.saturating_sub((d / 10).min(Duration::from_millis(100)))),
        None => wait,
    }
}

/// How a service honours `min_library_seq`.
#[derive(Clone)]
pub struct Consistency {
    /// The library of this process; None where reads go to another process's library.
    library: Option<Arc<ExpertLibrary>>,
    wait: Duration,
}

impl Consistency {
    /// Reads from the library of this process: they wait for it, at most `wait`.
    pub fn local(library: Arc<ExpertLibrary>, wait: Duration) -> Self {
        Self {
            library: Some(library),
            wait,
        }
    }

    /// Reads from another process's library: the seq is passed on to it.
    pub fn remote() -> Self {
        Self {
            library: None,
            wait: DEFAULT_MIN_SEQ_WAIT,
        }
    }

    /// Waits until this process's library has applied `min` (see [`wait_for_seq`]), at most
    /// the server's bound and `deadline`. Nothing to wait for without a local library.
    pub async fn wait(&self, min: u64, deadline: Option<Duration>) -> Result<(), Status> {
        match &self.library {
            Some(library) => wait_for_seq(library, min, bounded(self.wait, deadline)).await,
            None => Ok(()),
        }
    }

    /// Runs the read `f` as of seq `min`: after [`Self::wait`], with `min` passed on to the
    /// remote reads it makes ([`forwarded`]).
    pub async fn read<T>(
        &self,
        min: u64,
        metadata: &MetadataMap,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        self.wait(min, deadline(metadata)).await?;
        if min == 0 {
            return f.await;
        }
        MIN_LIBRARY_SEQ.scope(min, f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_deadline_is_read_from_grpc_timeout() {
        let mut m = MetadataMap::new();
        assert_eq!(deadline(&m), None);
        for (value, expected) in [
            ("200m", Some(Duration::from_millis(200))),
            ("3S", Some(Duration::from_secs(3))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5000u", Some(Duration::from_millis(5))),
            ("7n", Some(Duration::from_nanos(7))),
            ("12", None),
            ("m", None),
            ("x5m", None),
        ] {
            m.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(deadline(&m), expected, "{value}");
        }
    }

    #[test]
    fn a_wait_ends_before_the_deadline() {
        let two = Duration::from_secs(2);
        assert_eq!(bounded(two, None), two);
        assert_eq!(bounded(two, Some(Duration::from_secs(60))), two);
        assert_eq!(
            bounded(two, Some(Duration::from_millis(100))),
            Duration::from_millis(90)
        );
        assert_eq!(
            bounded(two, Some(Duration::from_secs(1))),
            Duration::from_millis(900)
        );
        assert_eq!(bounded(two, Some(Duration::ZERO)), Duration::ZERO);
    }

    #[tokio::test]
    async fn the_seq_is_forwarded_inside_a_read_only() {
        assert_eq!(forwarded(), 0);
        let c = Consistency::remote();
        let seen = c
            .read(42, &MetadataMap::new(), async { Ok(forwarded()) })
            .await
            .unwrap();
        assert_eq!(seen, 42);
        assert_eq!(forwarded(), 0);
    }
}
