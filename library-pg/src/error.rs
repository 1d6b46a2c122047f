//! What a PostgreSQL failure means to roe's callers. The service maps `LibraryError`s onto
//! gRPC statuses, so the kind matters more than the text: a database that cannot be reached
//! is UNAVAILABLE (retry later: nothing was written), a deployment mistake (credentials,
//! privileges, a missing database) is FAILED_PRECONDITION with what to fix, anything else
//! is an internal storage error.
//!
//! Database URLs carry passwords: every URL this crate prints goes through [`redact`].

use std::error::Error as _;

use roe_expert_library::LibraryError;

/// Why a store operation stopped, before it becomes a [`LibraryError`]: the retry loop
/// treats each kind differently (see `PgStore::run`).
#[derive(Debug)]
pub(crate) enum Failure {
    /// The database failed a statement (or the connection did), before any COMMIT was
    /// sent: nothing was written.
    Pg(postgres::Error),
    /// COMMIT itself failed: on a lost connection the write may or may not have committed.
    Commit(postgres::Error),
    /// roe refused or could not decode something: final, never retried.
    Lib(LibraryError),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl From<LibraryError> for Failure {
    fn from(e: LibraryError) -> Self {
        Self::Lib(e)
    }
}

/// tokio-postgres's `Display` stops at the error's kind ("db error", "error connecting to
/// server"); the server's message or the I/O error is its source.
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("; hint: {hint}"));
        }
        return s;
    }
    match e.source() {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// Whether the connection (not the statement) failed: the server is down, restarting,
/// unreachable, refusing connections, or closed this session. Nothing the statement did is
/// committed, and another connection may well succeed later.
pub(crate) fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        // 08: connection exception; 57P01..03: admin shutdown, crash shutdown, cannot
        // connect now (starting up, shutting down, in recovery); 53300: too many clients.
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    if e.as_db_error().is_some() {
        return false;
    }
    // No server error: an I/O failure connecting, reading or writing, or a timeout. The
    // kinds are private to tokio-postgres; its I/O errors carry the io::Error as source,
    // its timeouts only their text. A message that could not be encoded (a parameter too
    // large) also carries an io::Error, but nothing was sent: the connection is fine.
    let text = e.to_string();
    if text == "error encoding message to server" {
        return false;
    }
    let mut src = e.source();
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    matches!(
        text.as_str(),
        "timeout waiting for server"
            | "error connecting to server"
            | "error communicating with the server"
    )
}

/// Serialization failures and deadlocks: the transaction was rolled back and may simply be
/// run again.
pub(crate) fn is_retryable(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code(), "40001" | "40P01"))
}

/// The `LibraryError` for a database failure; `at` names the database for messages
/// ("the library's database at postgres@db:5432/roe"), never with a password.
pub(crate) fn from_pg(e: &postgres::Error, at: &str) -> LibraryError {
    if is_connection_error(e) {
        return LibraryError::Unavailable(format!("{at} is unavailable: {}", describe(e)));
    }
    match e.code().map(|c| c.code()) {
        Some("28P01" | "28000") => LibraryError::FailedPrecondition(format!(
            "{at} refused roe's credentials ({}); check the user and password of the database URL",
            describe(e)
        )),
        Some("42501") => LibraryError::FailedPrecondition(format!(
            "{at}: roe's database user lacks a privilege ({}); grant it: roe creates its tables \
             when it first starts on a database, then reads and writes them",
            describe(e)
        )),
        Some("3D000") => LibraryError::FailedPrecondition(format!(
            "{at} does not exist ({}); create it (CREATE DATABASE) or fix the database URL",
            describe(e)
        )),
        // No SQLSTATE: the client refused before asking the server (a password the server
        // asked for and the URL lacks, an unsupported SASL mechanism).
        None if e.to_string() == "authentication error" => {
            LibraryError::FailedPrecondition(format!(
                "{at}: authentication failed ({}); check the database URL",
                describe(e)
            ))
        }
        _ => LibraryError::Storage(format!("{at}: {}", describe(e))),
    }
}

const HIDDEN: &str = "***";

/// The database URL fit for logs and messages: its password, if any, replaced by `***`.
/// Handles both forms libpq (and tokio-postgres) accept: `postgres://user:pw@host/db?...`
/// (and a `password=` query parameter) and `host=... password=...` key/value strings.
pub fn redact(url: &str) -> String {
    match url_body(url) {
        Some(at) => redact_url(url, at),
        None => redact_key_values(url),
    }
}

/// Where what follows `postgres://` or `postgresql://` starts; None for a key/value string.
pub(crate) fn url_body(url: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))
        .map(|p| p.len())
}

fn redact_url(url: &str, body: usize) -> String {
    let (scheme, rest) = url.split_at(body);
    let query_at = rest.find('?').unwrap_or(rest.len());
    // The credentials end at the last `@` before the query: an unencoded `@` in the password
    // then stays hidden too (tokio-postgres splits at the first `@`; hiding more is safe).
    let (creds, tail) = match rest[..query_at].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let mut out = String::from(scheme);
    if let Some(creds) = creds {
        match creds.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:{HIDDEN}@")),
            None => out.push_str(&format!("{creds}@")),
        }
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k == "password" => format!("{k}={HIDDEN}"),
                    _ => p.to_string(),
                })
                .collect();
            out.push_str(path);
            out.push('?');
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// `key = value` pairs separated by whitespace, a value either bare or in single quotes
/// with backslash escapes (libpq's conninfo syntax).
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        // Whitespace between pairs.
        let ws = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        if rest.is_empty() {
            break;
        }
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        out.push_str(key);
        rest = &rest[key_end..];
        // Optional whitespace, `=`, optional whitespace.
        let before_eq = rest.len() - rest.trim_start().len();
        if !rest[before_eq..].starts_with('=') {
            continue;
        }
        let after_eq = before_eq + 1;
        let ws2 = rest[after_eq..].len() - rest[after_eq..].trim_start().len();
        let value_at = after_eq + ws2;
        out.push_str(&rest[..value_at]);
        rest = &rest[value_at..];
        let value_len = value_len(rest);
        if key == "password" {
            out.push_str(HIDDEN);
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
    out
}

/// Length of the conninfo value `s` starts with (quoted or bare).
fn value_len(s: &str) -> usize {
    if let Some(quoted) = s.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => return 1 + i + 1,
                _ => {}
            }
        }
        return s.len();
    }
    s.find(char::is_whitespace).unwrap_or(s.len())
}

/// `url` naming database `db` instead of its own: the path of a `postgres://` URL
/// (any `dbname=` parameter dropped), or a `dbname=` appended to a key/value string (the
/// last setting wins).
pub fn with_dbname(url: &str, db: &str) -> String {
    let Some(body) = url_body(url) else {
        return format!("{url} dbname={db}");
    };
    let (scheme, rest) = url.split_at(body);
    // Where the host starts: after the credentials, which tokio-postgres ends at the first
    // `@`.
    let host_at = rest.find('@').map_or(0, |i| i + 1);
    let path_at = rest[host_at..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| host_at + i);
    let query = rest[path_at..].find('?').map(|i| &rest[path_at + i + 1..]);
    let mut out = format!("{scheme}{}/{db}", &rest[..path_at]);
    if let Some(query) = query {
        let params: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("dbname="))
            .collect();
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbnames_are_replaced() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_dbname("postgres://u:p@h:1/postgres?sslmode=disable&dbname=x", "t1"),
            "postgres://u:p@h:1/t1?sslmode=disable"
        );
        assert_eq!(with_dbname("postgresql://h", "t1"), "postgresql://h/t1");
        assert_eq!(
            with_dbname("postgres://h?connect_timeout=3", "t1"),
            "postgres://h/t1?connect_timeout=3"
        );
        assert_eq!(
            with_dbname("host=/tmp port=5 user=postgres", "t1"),
            "host=/tmp port=5 user=postgres dbname=t1"
        );
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact("postgres://roe:s3cret@db.example:5432/roe"),
            "postgres://roe:***@db.example:5432/roe"
        );
        assert_eq!(redact("postgresql://roe@db/roe"), "postgresql://roe@db/roe");
        assert_eq!(redact("postgres://db/roe"), "postgres://db/roe");
        assert_eq!(
            redact("postgres://u:p@ss@db/roe?sslmode=disable&password=x"),
            "postgres://u:***@db/roe?sslmode=disable&password=***"
        );
        assert_eq!(
            redact("host=db user=roe password=s3cret dbname=roe"),
            "host=db user=roe password=*** dbname=roe"
        );
        assert_eq!(
            redact("host=db password = 'a b\\' c' dbname=roe"),
            "host=db password = *** dbname=roe"
        );
    }
}
