//! The one place where errors become gRPC statuses (and, for the clients of a remote
//! library or router, where statuses become the serving core's errors again).

use roe_expert_library::LibraryError;
use roe_serving::{ErrorKind, ServingError};
use roe_trainer::TrainError;
use tonic::{Code, Status};

/// Most bytes of a status message. It travels percent-encoded in the `grpc-message` header
/// (up to 3 bytes per byte), and clients refuse headers past their metadata limit (8 KiB in
/// grpcio): a longer message would reach the caller as "Stream removed", not as its status.
const MAX_MESSAGE_BYTES: usize = 1024;

fn message(text: String) -> String {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut cut = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (truncated)", &text[..cut])
}

/// A library error, classified as the serving core classifies it (internal ones logged).
pub fn library_status(e: LibraryError) -> Status {
    serving_status(ServingError::from(e))
}

/// A read's wait for its `min_library_seq` that ran out: UNAVAILABLE naming both seqs, logged
/// as a lagging replica rather than as a store that is down (other errors as
/// [`library_status`]).
pub fn min_seq_status(e: LibraryError) -> Status {
    match e {
        LibraryError::Unavailable(why) => {
            tracing::debug!("{why}");
            Status::unavailable(message(why))
        }
        e => library_status(e),
    }
}

/// A training error: bad recipes and rows are INVALID_ARGUMENT naming the field.
pub fn training_status(e: TrainError) -> Status {
    let code = match &e {
        TrainError::Invalid { .. } => Code::InvalidArgument,
        TrainError::JobNotFound(_) => Code::NotFound,
        TrainError::FailedPrecondition(_) => Code::FailedPrecondition,
        TrainError::QueueFull(_) | TrainError::TooLarge { .. } => Code::ResourceExhausted,
        TrainError::Cancelled => Code::Cancelled,
        _ => {
            tracing::error!(error = %e, "training failed");
            Code::Internal
        }
    };
    Status::new(code, message(e.to_string()))
}

/// A serving-core error, by its kind.
pub fn serving_status(e: ServingError) -> Status {
    let code = match e.kind {
        // OpenAI's context_length_exceeded is a 400: the caller's request, not a capacity.
        ErrorKind::InvalidArgument | ErrorKind::ContextLengthExceeded => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, message(e.message))
}

/// A status from a remote library or router, as the serving core's error: its code kept
/// (NOT_FOUND stays NOT_FOUND), a code the core has no kind for becomes INTERNAL.
pub fn remote_error(what: &str, s: Status) -> ServingError {
    let kind = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::Aborted => ErrorKind::Aborted,
        Code::Unavailable => ErrorKind::Unavailable,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        _ => ErrorKind::Internal,
    };
    let text = match kind {
        // The remote side's own words, for the caller's mistakes and missing experts.
        ErrorKind::InvalidArgument
        | ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Aborted
        | ErrorKind::ResourceExhausted => s.message().to_string(),
        _ => format!("{what}: {}", s.message()),
    };
    ServingError::new(kind, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_codes_and_long_messages_are_truncated() {
        let s = serving_status(ServingError::invalid("input", "x".repeat(5000)));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("input: xxx"));
        assert!(s.message().ends_with("(truncated)"));
        assert!(s.message().len() < 1100);
        // Bytes, not characters, bound it: multibyte text is cut on a character boundary.
        let s = serving_status(ServingError::invalid("input", "é✓".repeat(2000)));
        assert!(s.message().len() < 1100, "{}", s.message().len());
        assert!(s.message().ends_with("(truncated)"));
        assert_eq!(
            serving_status(ServingError::internal("boom")).code(),
            Code::Internal
        );
        let exists = library_status(LibraryError::AlreadyExists {
            id: "a".into(),
            version: 1,
        });
        assert_eq!(exists.code(), Code::AlreadyExists);
        assert_eq!(
            library_status(LibraryError::Empty).code(),
            Code::FailedPrecondition
        );
        let back = remote_error("the library", Status::not_found("expert not found: a"));
        assert_eq!(back.kind, ErrorKind::NotFound);
        assert_eq!(back.message, "expert not found: a");
        let back = remote_error("the library", Status::unavailable("connection refused"));
        assert_eq!(back.kind, ErrorKind::Unavailable);
        assert_eq!(back.message, "the library: connection refused");
        let late = min_seq_status(LibraryError::Unavailable(
            "min_library_seq: this replica has applied the library up to seq 3".into(),
        ));
        assert_eq!(late.code(), Code::Unavailable);
        assert!(late.message().starts_with("min_library_seq: "), "{late:?}");
        assert_eq!(
            min_seq_status(LibraryError::Empty).code(),
            Code::FailedPrecondition
        );
    }
}
