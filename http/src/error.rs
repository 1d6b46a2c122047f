//! The one place where errors become HTTP responses: the OpenAI error body
//! (`{"error": {"message", "type", "param", "code"}}`) with the status an OpenAI client
//! expects, for the OpenAI endpoints and roe's own alike.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use roe_serving::{ErrorKind, ServingError};
use serde::Serialize;

/// Most bytes of an error message (as the gRPC statuses): client text quoted in it is cut.
const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The OpenAI error type: invalid_request_error, authentication_error, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

fn cut(text: String) -> String {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (truncated)", &text[..end])
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: cut(message.into()),
            kind,
            param: None,
            code: None,
        }
    }

    /// A bad request naming `param`.
    pub fn invalid(param: &str, message: impl std::fmt::Display) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("{param}: {message}"),
            )
        }
    }

    /// A field this server does not implement: refused rather than ignored.
    pub fn unsupported(param: &str, why: &str) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(param, why)
        }
    }

    pub fn not_found(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The same error with the request field renamed (the core names its own fields, e.g.
    /// `max_new_tokens`, which an OpenAI request calls `max_tokens`).
    pub fn renamed(mut self, renames: &[(&str, &str)]) -> Self {
        let Some(param) = self.param.clone() else {
            return self;
        };
        for (from, to) in renames {
            let rest = if param == *from {
                Some("")
            } else {
                param
                    .strip_prefix(from)
                    .filter(|r| r.starts_with('.') || r.starts_with('['))
            };
            if let Some(rest) = rest {
                let renamed = format!("{to}{rest}");
                if let Some(m) = self.message.strip_prefix(&param) {
                    self.message = format!("{renamed}{m}");
                }
                self.param = Some(renamed);
                break;
            }
        }
        self
    }

    /// The error with `field.` (or `field[i].`) in front of its field.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self.param = Some(format!("{prefix}{}", self.param.unwrap_or_default()));
        self
    }
}

/// The field a core message names: `field: text`, the field without spaces.
fn field_of(message: &str) -> Option<String> {
    let (field, _) = message.split_once(": ")?;
    let plain = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c));
    plain.then(|| field.to_string())
}

impl From<ServingError> for ApiError {
    fn from(e: ServingError) -> Self {
        let (status, kind, code) = match e.kind {
            ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ErrorKind::ContextLengthExceeded => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ErrorKind::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "invalid_request_error", None),
            // A compare-and-set that lost: 412, as an HTTP If-Match that does not match.
            ErrorKind::Aborted => (
                StatusCode::PRECONDITION_FAILED,
                "invalid_request_error",
                Some("version_mismatch"),
            ),
            ErrorKind::FailedPrecondition => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("failed_precondition"),
            ),
            // A request over a limit is the request's fault: 400, as OpenAI answers a prompt
            // past the context length (a 429 would have clients retry it unchanged). A full
            // disk is the server's.
            ErrorKind::ResourceExhausted if e.message.starts_with("disk full") => (
                StatusCode::INSUFFICIENT_STORAGE,
                "server_error",
                Some("disk_full"),
            ),
            ErrorKind::ResourceExhausted => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("limit_exceeded"),
            ),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            ErrorKind::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
            // Nobody reads it: the client went away.
            ErrorKind::Cancelled => (StatusCode::REQUEST_TIMEOUT, "server_error", None),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        Self {
            param: field_of(&e.message),
            code,
            ..Self::new(status, kind, e.message)
        }
    }
}

/// A status from the gRPC layer's conversions (the proto mirrors share them).
impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let kind = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::Aborted => ErrorKind::Aborted,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Internal,
        };
        ServingError::new(kind, s.message()).into()
    }
}

impl From<roe_expert_library::LibraryError> for ApiError {
    fn from(e: roe_expert_library::LibraryError) -> Self {
        ServingError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_keep_their_field_and_get_openai_statuses() {
        let e = ApiError::from(ServingError::invalid("max_new_tokens", "at most 512"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_new_tokens"));
        let e = e.renamed(&[("max_new_tokens", "max_tokens")]);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "max_tokens: at most 512");
        let e = ApiError::from(ServingError::new(ErrorKind::NotFound, "no expert \"x\""));
        assert_eq!((e.status, e.param), (StatusCode::NOT_FOUND, None));
        let e = ApiError::from(ServingError::too_large("input", "more than 16384 bytes"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("limit_exceeded"));
        let e = ApiError::invalid("x", "y".repeat(5000));
        assert!(e.message.len() < 1100 && e.message.ends_with("(truncated)"));
        let e = ApiError::from(ServingError::invalid("inputs[2].input", "empty"))
            .renamed(&[("inputs", "prompt")]);
        assert_eq!(e.param.as_deref(), Some("prompt[2].input"));
    }
}
