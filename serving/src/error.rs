//! The serving core's one error type. Every failure a request can meet is classified here by
//! what the caller should do about it; the gRPC layer maps [`ErrorKind`] to a status code in
//! one place (`roe-services`' `status` module) and never looks at messages.

use std::sync::Arc;

use roe_backbone::BackboneError;
use roe_expert_library::LibraryError;

/// What kind of failure: the caller's input, the state of an expert, capacity, or ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong; the message names the field.
    InvalidArgument,
    /// No such expert.
    NotFound,
    /// The expert exists already (a write that must not replace it).
    AlreadyExists,
    /// The expert exists but cannot serve this request (wrong backbone, unusable adapter).
    FailedPrecondition,
    /// The request's prompt is longer than the backbone may read for it (its context, less
    /// what the answer needs): the caller's to shorten or to ask to be cut. The message names
    /// the field. INVALID_ARGUMENT over gRPC; OpenAI's `context_length_exceeded` over HTTP.
    ContextLengthExceeded,
    /// The request is larger than a limit allows.
    ResourceExhausted,
    /// A write's expected version (compare-and-set) was not the stored one: the caller's to
    /// read again and decide.
    Aborted,
    /// A part of the service is not reachable or has stopped (a remote library, a worker).
    Unavailable,
    /// A remote part did not answer in time.
    DeadlineExceeded,
    /// The request was withdrawn (its client went away or its deadline passed) before its
    /// work was done; nobody is left to read this.
    Cancelled,
    /// A fault of the service: an invariant broke or a worker panicked.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ServingError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ServingError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    /// `field: message`, the caller's mistake.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidArgument, format!("{field}: {message}"))
    }
    /// `field: message`, over a limit.
    pub fn too_large(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::ResourceExhausted, format!("{field}: {message}"))
    }
    /// `field: message`, a prompt past the context.
    pub fn context_length(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::ContextLengthExceeded,
            format!("{field}: {message}"),
        )
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// The same error with `field: ` in front of its message (an ensemble member, an input
    /// of Answer), keeping its kind.
    pub fn prefixed(self, field: &str) -> Self {
        Self {
            kind: self.kind,
            message: format!("{field}: {}", self.message),
        }
    }
}

/// A backbone error: the caller's expert → FAILED_PRECONDITION, the caller's input →
/// INVALID_ARGUMENT, anything else (a tensor computation failing) → INTERNAL.
impl From<BackboneError> for ServingError {
    fn from(e: BackboneError) -> Self {
        let kind = if e.is_expert_error() {
            ErrorKind::FailedPrecondition
        } else if e.is_invalid_input() {
            ErrorKind::InvalidArgument
        } else {
            tracing::error!(error = %e, "backbone failed");
            ErrorKind::Internal
        };
        Self::new(kind, e.to_string())
    }
}

impl From<LibraryError> for ServingError {
    fn from(e: LibraryError) -> Self {
        let kind = match &e {
            LibraryError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            LibraryError::NotFound { .. } => ErrorKind::NotFound,
            LibraryError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            LibraryError::FailedPrecondition(_) | LibraryError::Empty => {
                ErrorKind::FailedPrecondition
            }
            LibraryError::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            LibraryError::Aborted { .. } => ErrorKind::Aborted,
            LibraryError::Unavailable(_) => {
                tracing::warn!(error = %e, "the library's store is unavailable");
                ErrorKind::Unavailable
            }
            _ if e.is_disk_full() => {
                tracing::error!(error = %e, "the disk is full: a write was refused");
                return Self::new(
                    ErrorKind::ResourceExhausted,
                    format!("disk full: nothing was stored ({e})"),
                );
            }
            LibraryError::Cancelled => ErrorKind::Cancelled,
            LibraryError::Storage(_)
            | LibraryError::Encoder(_)
            | LibraryError::Index(_)
            | LibraryError::Io { .. } => {
                tracing::error!(error = %e, "library failed");
                ErrorKind::Internal
            }
        };
        Self::new(kind, e.to_string())
    }
}

pub type Result<T, E = ServingError> = std::result::Result<T, E>;

/// Runs blocking work (sled reads, CPU-bound parsing) off the async workers; a panic in it
/// becomes INTERNAL instead of taking the caller down.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServingError::internal(format!("a worker failed: {e}")))?
}

/// Blocking work that stops when its caller stops waiting: `f` gets a `wanted()` check to ask
/// between steps, false once the future of this call has been dropped (tonic drops a
/// handler's future when its client goes away or its `grpc-timeout` passes).
pub async fn blocking_while_wanted<T: Send + 'static>(
    f: impl FnOnce(&dyn Fn() -> bool) -> Result<T> + Send + 'static,
) -> Result<T> {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct WithdrawOnDrop(Arc<AtomicBool>);
    impl Drop for WithdrawOnDrop {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let wanted = Arc::new(AtomicBool::new(true));
    let _withdraw = WithdrawOnDrop(wanted.clone());
    blocking(move || f(&|| wanted.load(Ordering::Relaxed))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_resource_exhausted_and_says_so() {
        let full = LibraryError::io("lib/roe-adapters/x", std::io::Error::from_raw_os_error(28));
        let e = ServingError::from(full);
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert!(
            e.message.starts_with("disk full: nothing was stored"),
            "{}",
            e.message
        );
        let other = LibraryError::io("lib", std::io::Error::from_raw_os_error(5));
        assert_eq!(ServingError::from(other).kind, ErrorKind::Internal);
    }
}
