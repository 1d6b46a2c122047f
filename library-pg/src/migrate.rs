//! The library's schema, versioned: the SQL files in `library-pg/migrations/`
//! (`V{n}__{name}.sql`, refinery's naming) are compiled into roe and applied at start, each
//! in its own transaction, recorded in refinery's `refinery_schema_history` table.
//!
//! Replicas starting together all call [`migrate`]: a session-level advisory lock makes
//! them take turns, so one applies what is missing and the others find nothing to do. A
//! database migrated by a newer roe (a version this binary does not know) is refused with a
//! message that says so, before anything is touched: an older roe must not write a schema it
//! does not understand.

use std::error::Error as _;

use postgres::Client;
use roe_expert_library::{LibraryError, Result};

use crate::error::from_pg;

#[allow(unused_imports, clippy::all)]
mod embedded {
    // Relative to this crate's Cargo.toml (CARGO_MANIFEST_DIR).
    refinery::embed_migrations!("migrations");
}

/// The highest schema version this roe knows (its newest migration file). A test checks it
/// against the embedded files.
pub const SCHEMA_VERSION: i32 = 1;

/// The advisory lock key migrations run under ("roe_migr" in ASCII): any constant works,
/// as long as every roe uses the same one.
const MIGRATION_LOCK: i64 = 0x726f_655f_6d69_6772;

/// refinery's history table (its default name).
const HISTORY_TABLE: &str = "refinery_schema_history";

const DB: &str = "the library's database";

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The migrations applied now, in order (`V1__initial`, ...); empty when the database
    /// was up to date.
    pub applied: Vec<String>,
    /// The database's schema version afterwards.
    pub schema_version: i32,
}

/// Brings the database's schema up to this roe's [`SCHEMA_VERSION`], under an advisory lock
/// held on `client`'s session (released before returning, and by PostgreSQL should the
/// session die). Waits for another replica's migration to finish first.
pub fn migrate(client: &mut Client) -> Result<MigrationReport> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| from_pg(&e, DB))?;
    let result = migrate_locked(client);
    if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]) {
        // The session is likely gone, and its lock with it.
        tracing::warn!(
            "releasing the migration lock on the library's database: {}",
            crate::error::describe(&e)
        );
    }
    result
}

/// The highest migration version compiled into this roe.
pub fn embedded_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| clamp_version(i64::from(m.version())))
        .max()
        .unwrap_or(0)
}

/// The database's schema version: the highest migration applied to it, None when roe never
/// migrated it (refinery's history table is absent or empty).
pub fn database_schema_version(client: &mut Client) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .and_then(|row| row.try_get(0))
        .map_err(|e| from_pg(&e, DB))?;
    if !exists {
        return Ok(None);
    }
    // Cast: refinery's version column is int4, or int8 with its int8-versions feature.
    let version: Option<i64> = client
        .query_one(
            &format!("SELECT max(version)::bigint FROM {HISTORY_TABLE}"),
            &[],
        )
        .and_then(|row| row.try_get(0))
        .map_err(|e| from_pg(&e, DB))?;
    Ok(version.map(clamp_version))
}

fn clamp_version(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX })
}

fn migrate_locked(client: &mut Client) -> Result<MigrationReport> {
    let known = embedded_version();
    let found = database_schema_version(client)?;
    match found {
        Some(found) if found > known => return Err(newer_schema(found, known)),
        // Up to date: no DDL at all (refinery would still CREATE TABLE IF NOT EXISTS its
        // history table, which needs the CREATE privilege on the schema), so a database user
        // without it may run roe on a database an administrator migrated.
        Some(found) if found == known => {
            return Ok(MigrationReport {
                applied: Vec::new(),
                schema_version: found,
            })
        }
        _ => {}
    }
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run(client)
        .map_err(from_refinery)?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    for m in &applied {
        tracing::info!(migration = %m, "applied a schema migration to the library's database");
    }
    let schema_version = database_schema_version(client)?.unwrap_or(0);
    Ok(MigrationReport {
        applied,
        schema_version,
    })
}

fn newer_schema(found: i32, known: i32) -> LibraryError {
    LibraryError::FailedPrecondition(format!(
        "the database's schema is at version {found}, newer than this roe knows ({known}): \
         upgrade roe to the release that migrated it (or later), or use another database"
    ))
}

/// refinery's errors: a database error underneath maps like any other; a history that does
/// not match this roe's migrations is a deployment problem.
fn from_refinery(e: refinery::Error) -> LibraryError {
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(pg) = s.downcast_ref::<postgres::Error>() {
            return from_pg(pg, "the library's database (migrating its schema)");
        }
        src = s.source();
    }
    match e.kind() {
        refinery::error::Kind::DivergentVersion(applied, ours) => {
            LibraryError::FailedPrecondition(format!(
                "the database's schema migration {applied} differs from this roe's {ours}: \
                 another build of roe migrated it; use that build, or another database"
            ))
        }
        refinery::error::Kind::MissingVersion(m) => LibraryError::FailedPrecondition(format!(
            "the database's schema history does not match this roe's migrations (at {m}): \
             another build of roe migrated it; use that build, or another database"
        )),
        _ => LibraryError::Storage(format!("migrating the library's database: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_is_the_newest_migration() {
        assert_eq!(SCHEMA_VERSION, embedded_version());
    }

    #[test]
    fn newer_schemas_name_both_versions() {
        let msg = newer_schema(7, 1).to_string();
        assert!(msg.contains("version 7") && msg.contains("(1)"), "{msg}");
    }
}
