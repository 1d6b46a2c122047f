//! One error type for the domain core. Each variant maps onto one gRPC status in the service
//! layer, so the variant says *what kind* of failure it is and the message names the field.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LibraryError {
    /// The caller sent something malformed; `field` names the offending field.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{what} not found: {id}")]
    NotFound { what: &'static str, id: String },
    #[error("expert {id} already exists (version {version}); ask for a new version to replace it")]
    AlreadyExists { id: String, version: u64 },
    /// The expert's files are well formed but do not fit what they must fit (the backbone).
    #[error("expert does not fit: {0}")]
    FailedPrecondition(String),
    /// Routing needs at least one expert.
    #[error("the library holds no experts yet")]
    Empty,
    /// Over a limit or a quota; the message names the field and the limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller withdrew the request (it went away or its deadline passed) before the
    /// work was done.
    #[error("the request was withdrawn before it was done")]
    Cancelled,
    /// A write's expected version (compare-and-set) is not the stored one.
    #[error("expert {id} is at version {actual}, the write expected version {expected}")]
    Aborted {
        id: String,
        expected: u64,
        actual: u64,
    },
    /// The store cannot be reached (the shared database is down): nothing was written.
    #[error("{0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("encoder error: {0}")]
    Encoder(String),
    #[error("index error: {0}")]
    Index(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl LibraryError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl LibraryError {
    /// Whether the disk (or the user's quota on it) is full: the write was refused and left
    /// nothing behind, so the client may try again once space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => is_disk_full(source),
            _ => false,
        }
    }

    /// Whether a file or directory was not there: one that sled removed (a retired blob)
    /// between a listing and a look at it is not an error to whoever walks its files.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC, EDQUOT.
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122))
}

impl From<sled::Error> for LibraryError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(source) => Self::Io {
                path: "the store".into(),
                source,
            },
            other => Self::Storage(other.to_string()),
        }
    }
}

pub type Result<T, E = LibraryError> = std::result::Result<T, E>;
