//! The expert library's store in PostgreSQL ([`PgStore`]), for `roe serve --database-url`:
//! N replicas share one library, each keeping its routing state (vectors, HNSW, lexical
//! views) in memory and following the database's change log. sled stays the embedded
//! default for a single process.
//!
//! # Why PostgreSQL
//!
//! The replicas need one source of truth with transactions that span an expert's metadata,
//! adapter and instances, compare-and-set writes that replicas cannot both pass, quotas that
//! hold library-wide, and a log of changes in commit order. PostgreSQL gives all of that
//! with row locks and ordinary transactions; LISTEN/NOTIFY tells followers when to read the
//! log. No extension (pgvector) is needed: vectors are searched in each replica's memory.
//!
//! # How seqs work
//!
//! Every write is one transaction that starts with
//! `UPDATE library_meta SET head_seq = head_seq + 1 RETURNING head_seq`. That row's lock is
//! held until the write commits, so writers on all replicas queue on it: the seqs they get
//! are gapless and committed in seq order (a rolled-back write gives its seq back). A
//! `bigserial` would do neither (its values are handed out at insert, not at commit), and a
//! follower reading "changes after my seq" could then pass over a lower seq that commits
//! later. The write appends its `change_log` row under that seq and `pg_notify`s
//! `roe_changes` (delivered at commit); followers treat the notification as a doorbell only
//! and read the log from their applied seq, so a lost notification costs latency, never a
//! change. A snapshot (one REPEATABLE READ transaction) reads the head seq with every
//! expert and instance: the state at exactly that seq.
//!
//! # Schema
//!
//! Versioned SQL migrations in `library-pg/migrations/`, compiled in and applied at start
//! ([`migrate`]); a database migrated by a newer roe is refused.

mod codec;
mod error;
pub mod migrate;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod write;

pub use error::{redact, with_dbname};
pub use migrate::{MigrationReport, SCHEMA_VERSION};
pub use store::{PgConfig, PgStore};
