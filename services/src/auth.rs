//! API keys, in the conventions of TEI, TGI and qdrant: a client presents
//! `authorization: Bearer <key>` (or `api-key: <key>`) metadata. Admin keys may write and
//! read; read keys may route, score, generate, answer, get and list. Health is public;
//! reflection is public or needs a read key. Without any key configured everything is open
//! (`roe serve` then binds to loopback only unless told otherwise).
//!
//! The check is a tower layer in front of every service, so no handler can forget it, and it
//! refuses before a request's body is read.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::Status;

/// Shortest key accepted: guessing must not be an option.
pub const MIN_KEY_BYTES: usize = 16;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Read,
    Write,
}

/// What a key grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Admin,
}

impl Role {
    fn allows(self, access: Access) -> bool {
        match access {
            Access::Public | Access::Read => true,
            Access::Write => self == Role::Admin,
        }
    }
}

/// The access `path` (`/package.Service/Method`) needs. Methods not listed as reads are
/// writes, so a method added later is closed until it is classified.
pub fn access_of(path: &str, reflection_public: bool) -> Access {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Access::Public,
        (s, _) if s.starts_with("grpc.reflection.") => {
            if reflection_public {
                Access::Public
            } else {
                Access::Read
            }
        }
        ("roe.v1.ExpertLibrary", "GetExpert" | "ListExperts") => Access::Read,
        ("roe.v1.Router" | "roe.v1.Inference" | "roe.v1.Answerer", _) => Access::Read,
        ("roe.v1.Training", "GetTrainingJob" | "ListTrainingJobs" | "WatchTraining") => {
            Access::Read
        }
        _ => Access::Write,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{flag}: cannot read {path}: {reason}")]
    File {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("{flag}: key {n} is {len} bytes; keys need at least {MIN_KEY_BYTES}")]
    TooShort {
        flag: &'static str,
        n: usize,
        len: usize,
    },
    #[error("{flag}: key {n} has characters outside printable ASCII (or spaces)")]
    NotPrintable { flag: &'static str, n: usize },
    #[error("{flag}: key {n} is also given in {other}")]
    Duplicate {
        flag: &'static str,
        n: usize,
        other: &'static str,
    },
}

/// One configured key. Its name (`NAME:` before the secret, or the flag and position) is
/// what logs show; the secret never is.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub role: Role,
    secret: Vec<u8>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The keys a server accepts.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// A key entry may carry a name for the logs: `NAME:SECRET`, NAME of letters, digits, `-`, `_`.
fn split_name(entry: &str) -> (Option<&str>, &str) {
    match entry.split_once(':') {
        Some((name, secret))
            if !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            (Some(name), secret)
        }
        _ => (None, entry),
    }
}

/// The entries of a flag's value: a comma-separated list, or `@FILE` with one per line
/// (blank lines and `#` comments skipped).
fn entries(flag: &'static str, value: &str) -> Result<Vec<String>, KeyError> {
    let value = value.trim();
    if let Some(path) = value.strip_prefix('@') {
        let text = std::fs::read_to_string(Path::new(path)).map_err(|e| KeyError::File {
            flag,
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect())
    } else {
        Ok(value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect())
    }
}

impl ApiKeys {
    /// Keys from `--admin-keys` and `--read-keys` values (either may be empty).
    pub fn parse(admin: &str, read: &str) -> Result<Self, KeyError> {
        let mut keys: Vec<ApiKey> = Vec::new();
        for (flag, role, value) in [
            ("admin-keys", Role::Admin, admin),
            ("read-keys", Role::Read, read),
        ] {
            for (i, entry) in entries(flag, value)?.iter().enumerate() {
                let n = i + 1;
                let (name, secret) = split_name(entry);
                if secret.len() < MIN_KEY_BYTES {
                    return Err(KeyError::TooShort {
                        flag,
                        n,
                        len: secret.len(),
                    });
                }
                if !secret.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(KeyError::NotPrintable { flag, n });
                }
                if let Some(other) = keys.iter().find(|k| k.secret == secret.as_bytes()) {
                    return Err(KeyError::Duplicate {
                        flag,
                        n,
                        other: match other.role {
                            Role::Admin => "admin-keys",
                            Role::Read => "read-keys",
                        },
                    });
                }
                keys.push(ApiKey {
                    name: name.map_or_else(|| format!("{flag}#{n}"), String::from),
                    role,
                    secret: secret.as_bytes().to_vec(),
                });
            }
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key `presented` is, compared in constant time against every configured key (the
    /// time taken says nothing of which key, if any, came close).
    pub fn find(&self, presented: &[u8]) -> Option<&ApiKey> {
        let mut found = None;
        for k in &self.keys {
            if constant_time_eq::constant_time_eq(&k.secret, presented) {
                found = Some(k);
            }
        }
        found
    }
}

/// The key a request presents: `authorization: Bearer <key>` or `api-key: <key>` (the
/// same headers on gRPC and HTTP).
pub fn presented(h: &http::HeaderMap) -> Option<&[u8]> {
    if let Some(v) = h.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        return match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => Some(v[7..].trim_ascii()),
            _ => None,
        };
    }
    h.get("api-key").map(|v| v.as_bytes().trim_ascii())
}

/// Who made a call that passed the key check, carried on its response (an extension) so
/// that the audit line written when the call ends can name the key and the outcome.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's name; `-` when the server checks no keys.
    pub key: Arc<str>,
    pub access: Access,
}

/// Whether `req` may go on (and who asks), or the refusal. Logs every refusal of a key
/// (target `audit`); what a call that passed does is logged when it ends ([`audit_end`]).
pub fn check<B>(
    keys: &ApiKeys,
    reflection_public: bool,
    req: &http::Request<B>,
) -> Result<Caller, Status> {
    let path = req.uri().path();
    let access = access_of(path, reflection_public);
    if keys.is_empty() || access == Access::Public {
        return Ok(Caller {
            key: Arc::from("-"),
            access,
        });
    }
    let Some(presented) = presented(req.headers()) else {
        tracing::warn!(target: "audit", method = path, "refused: no API key");
        return Err(Status::unauthenticated(
            "authorization: no API key; send `authorization: Bearer <key>` or `api-key: <key>`",
        ));
    };
    let Some(key) = keys.find(presented) else {
        tracing::warn!(target: "audit", method = path, "refused: unknown API key");
        return Err(Status::unauthenticated(
            "authorization: the API key is not valid",
        ));
    };
    if !key.role.allows(access) {
        tracing::warn!(target: "audit", method = path, key = %key.name, "refused: read key on a write");
        return Err(Status::permission_denied(format!(
            "authorization: {path} writes; the key {:?} may only read",
            key.name
        )));
    }
    Ok(Caller {
        key: Arc::from(key.name.as_str()),
        access,
    })
}

/// Whether a status (its canonical name) refuses the request for what it asked, as opposed
/// to the server failing it or the client going away.
pub fn is_refusal(status: &str) -> bool {
    matches!(
        status,
        "INVALID_ARGUMENT"
            | "NOT_FOUND"
            | "ALREADY_EXISTS"
            | "PERMISSION_DENIED"
            | "RESOURCE_EXHAUSTED"
            | "FAILED_PRECONDITION"
            | "OUT_OF_RANGE"
            | "UNAUTHENTICATED"
    )
}

/// The audit line of a call that passed the key check, written when it ends: one per write
/// (`write`, with its status) and one per refused call (`refused`, with its status), each
/// naming the key, never showing it. Refusals of what a call asked are the client's
/// business, so they are info, as writes are; a key refused is a warning.
pub fn audit_end(caller: &Caller, method: &str, status: &str) {
    let key = &*caller.key;
    if is_refusal(status) {
        tracing::info!(target: "audit", method, key, status, "refused");
    } else if caller.access == Access::Write {
        tracing::info!(target: "audit", method, key, status, "write");
    }
}

/// The tower layer that runs [`check`] before every service.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    keys: Arc<ApiKeys>,
    reflection_public: bool,
}

impl AuthLayer {
    pub fn new(keys: Arc<ApiKeys>, reflection_public: bool) -> Self {
        Self {
            keys,
            reflection_public,
        }
    }

    /// The keys checked (the HTTP API checks the same ones).
    pub fn keys(&self) -> &Arc<ApiKeys> {
        &self.keys
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match check(&self.layer.keys, self.layer.reflection_public, &req) {
            Ok(caller) => {
                let response = self.inner.call(req);
                Box::pin(async move {
                    let mut response = response.await?;
                    response.extensions_mut().insert(caller);
                    Ok(response)
                })
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// A client's key, sent as `authorization: Bearer <key>` on every call (none: nothing sent).
#[derive(Clone, Default)]
pub struct ClientKey(Option<MetadataValue<Ascii>>);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ClientKey(set)"
        } else {
            "ClientKey(none)"
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("api-key: the key has characters that cannot travel in gRPC metadata")]
pub struct BadClientKey;

impl ClientKey {
    pub fn new(key: Option<&str>) -> Result<Self, BadClientKey> {
        match key.map(str::trim).filter(|k| !k.is_empty()) {
            None => Ok(Self(None)),
            Some(k) => format!("Bearer {k}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| BadClientKey),
        }
    }
}

impl tonic::service::Interceptor for ClientKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry a [`ClientKey`].
pub type KeyedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientKey>;

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "admin-secret-0123456789";
    const R: &str = "read-secret-0123456789";

    fn request(path: &str, header: Option<(&str, &str)>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(format!("http://x{path}"));
        if let Some((k, v)) = header {
            b = b.header(k, v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn methods_are_classified_and_unknown_ones_are_writes() {
        for (path, want) in [
            ("/grpc.health.v1.Health/Check", Access::Public),
            ("/roe.v1.ExpertLibrary/ListExperts", Access::Read),
            ("/roe.v1.ExpertLibrary/GetExpert", Access::Read),
            ("/roe.v1.ExpertLibrary/RegisterExpert", Access::Write),
            ("/roe.v1.ExpertLibrary/DeleteExpert", Access::Write),
            ("/roe.v1.ExpertLibrary/MergeExperts", Access::Write),
            ("/roe.v1.Router/Route", Access::Read),
            ("/roe.v1.Inference/Generate", Access::Read),
            ("/roe.v1.Answerer/Answer", Access::Read),
            ("/roe.v1.Training/StartTraining", Access::Write),
            ("/roe.v1.Training/CancelTraining", Access::Write),
            ("/roe.v1.Training/WatchTraining", Access::Read),
            ("/roe.v1.Something/New", Access::Write),
            ("garbage", Access::Write),
        ] {
            assert_eq!(access_of(path, true), want, "{path}");
        }
        let refl = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(access_of(refl, true), Access::Public);
        assert_eq!(access_of(refl, false), Access::Read);
    }

    #[test]
    fn keys_parse_from_lists_and_files_with_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            format!("# rotation\nci:{R}\n\nread-secret-abcdefghij\n"),
        )
        .unwrap();
        let keys = ApiKeys::parse(
            &format!("{A}, ops:admin-second-0123456789"),
            &format!("@{}", file.display()),
        )
        .unwrap();
        assert_eq!(keys.len(), 4);
        let names: Vec<_> = keys
            .keys
            .iter()
            .map(|k| (k.name.as_str(), k.role))
            .collect();
        assert_eq!(
            names,
            [
                ("admin-keys#1", Role::Admin),
                ("ops", Role::Admin),
                ("ci", Role::Read),
                ("read-keys#2", Role::Read)
            ]
        );
        assert_eq!(keys.find(R.as_bytes()).unwrap().name, "ci");
        assert_eq!(
            keys.find(b"admin-second-0123456789").unwrap().role,
            Role::Admin
        );
        assert!(keys.find(b"admin-secret-012345678").is_none());
        assert!(keys.find(b"").is_none());
        assert!(
            format!("{keys:?}").find("secret-0123").is_none(),
            "Debug shows no secret"
        );
    }

    #[test]
    fn bad_keys_are_refused_naming_the_flag() {
        assert!(matches!(
            ApiKeys::parse("short", ""),
            Err(KeyError::TooShort {
                flag: "admin-keys",
                n: 1,
                len: 5
            })
        ));
        assert!(matches!(
            ApiKeys::parse("", &format!("{R},with space in-it-0123")),
            Err(KeyError::NotPrintable {
                flag: "read-keys",
                n: 2
            })
        ));
        assert!(matches!(
            ApiKeys::parse(A, A),
            Err(KeyError::Duplicate {
                flag: "read-keys",
                n: 1,
                other: "admin-keys"
            })
        ));
        assert!(matches!(
            ApiKeys::parse("@/no/such/file", ""),
            Err(KeyError::File {
                flag: "admin-keys",
                ..
            })
        ));
        assert!(ApiKeys::parse("", " , ").unwrap().is_empty());
    }

    #[test]
    fn requests_are_let_through_by_role() {
        let keys = ApiKeys::parse(A, R).unwrap();
        let write = "/roe.v1.ExpertLibrary/DeleteExpert";
        let read = "/roe.v1.Router/Route";
        let code = |path: &str, h: Option<(&str, &str)>| {
            check(&keys, false, &request(path, h))
                .err()
                .map(|s| s.code())
        };
        let bearer = |k: &str| format!("Bearer {k}");
        assert_eq!(code(write, None), Some(tonic::Code::Unauthenticated));
        assert_eq!(code(read, None), Some(tonic::Code::Unauthenticated));
        assert_eq!(code("/grpc.health.v1.Health/Check", None), None);
        assert_eq!(
            code(
                read,
                Some(("authorization", &bearer("wrong-key-0123456789")))
            ),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(read, Some(("authorization", &format!("Basic {R}")))),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(code(read, Some(("authorization", &bearer(R)))), None);
        assert_eq!(
            code(read, Some(("authorization", &format!("bearer  {R} ")))),
            None
        );
        assert_eq!(code(read, Some(("api-key", R))), None);
        assert_eq!(
            code(write, Some(("api-key", R))),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(code(write, Some(("authorization", &bearer(A)))), None);
        assert_eq!(code(read, Some(("api-key", A))), None);
        // The call knows who made it, for its audit line.
        let caller = check(&keys, false, &request(write, Some(("api-key", A)))).unwrap();
        assert_eq!(
            (&*caller.key, caller.access),
            ("admin-keys#1", Access::Write)
        );
        // No keys configured: open.
        let open = check(&ApiKeys::default(), false, &request(write, None)).unwrap();
        assert_eq!(&*open.key, "-");
        assert!(is_refusal("NOT_FOUND") && !is_refusal("OK") && !is_refusal("CANCELLED"));
    }

    #[test]
    fn a_client_key_travels_as_a_bearer_token() {
        use tonic::service::Interceptor;
        let mut k = ClientKey::new(Some(A)).unwrap();
        let r = k.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            r.metadata().get("authorization").unwrap(),
            &format!("Bearer {A}")
        );
        let mut none = ClientKey::new(Some("  ")).unwrap();
        assert!(none
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get("authorization")
            .is_none());
        assert!(ClientKey::new(Some("bad\nkey")).is_err());
        assert!(!format!("{k:?}").contains("secret"));
    }
}
