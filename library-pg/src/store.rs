//! [`PgStore`]: the library's store in PostgreSQL, over the blocking `postgres` client (the
//! store trait is synchronous and runs on blocking threads; never call it from an async
//! task: the client runs a small runtime of its own on the calling thread).

use std::str::FromStr;
use std::time::Duration;

use parking_lot::Mutex;
use postgres::config::Host;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, IsolationLevel, NoTls};
use roe_expert_library::library_store::{
    Change, Expect, LibraryStore, Quota, SnapshotItem, Written,
};
use roe_expert_library::store::StoredInstance;
use roe_expert_library::{ExpertMeta, LibraryError, PeftAdapter, Result};
use sha2::{Digest, Sha256};

use crate::codec::{
    change_of, check_config_storable, check_storable, get, instance_of, limit_i64, meta_of, to_i64,
    to_u64, CHANGE_COLUMNS, INSTANCE_COLUMNS,
};
use crate::error::{describe, from_pg, is_connection_error, is_retryable, redact, Failure};
use crate::write::{self, CHANNEL};

/// How to reach the library's database.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/dbname?...`, or libpq's `host=... dbname=...`.
    pub url: String,
    /// Idle connections kept for reuse (more are opened while more requests run at once).
    pub pool_size: usize,
    /// How long opening a connection may take; a `connect_timeout` in the URL wins.
    pub connect_timeout: Duration,
}

impl PgConfig {
    pub const DEFAULT_POOL_SIZE: usize = 4;
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        Self::new(String::new())
    }
}

/// Never prints the password.
impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Serialization failures and deadlocks a transaction is run again for.
const RETRIES: u32 = 5;

/// How long the LISTEN connection's health check may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared library store. Cheap to share (`Send + Sync`): every call checks a connection
/// out of a small pool and runs in transactions of its own.
pub struct PgStore {
    config: postgres::Config,
    /// "the library's database at user@host:port/db", for messages.
    at: String,
    url_redacted: String,
    pool_size: usize,
    /// Idle connections. A connection is only returned here after a call that left it
    /// healthy; one that failed at the connection level is dropped.
    pool: Mutex<Vec<Client>>,
    /// The follower's connection, LISTENing on [`CHANNEL`]; opened on first use.
    listener: Mutex<Option<Client>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url_redacted)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects, brings the schema up to date ([`crate::migrate::migrate`]) and keeps the
    /// connection for the pool. Fails with INVALID_ARGUMENT on a malformed URL, UNAVAILABLE
    /// when the server does not answer, FAILED_PRECONDITION on credentials, privileges, a
    /// missing database or a schema newer than this roe.
    pub fn connect(config: &PgConfig) -> Result<Self> {
        let url_redacted = redact(&config.url);
        if config.url.trim().is_empty() {
            return Err(LibraryError::invalid("database_url", "is empty"));
        }
        let mut pg = postgres::Config::from_str(&config.url).map_err(|e| {
            LibraryError::invalid(
                "database_url",
                format!("{url_redacted} is not a PostgreSQL URL: {}", describe(&e)),
            )
        })?;
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(LibraryError::invalid(
                "database_url",
                format!("{url_redacted} names no host"),
            ));
        }
        if pg.get_connect_timeout().is_none() && !config.connect_timeout.is_zero() {
            pg.connect_timeout(config.connect_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("roe");
        }
        let store = Self {
            at: format!("the library's database at {}", target(&pg)),
            config: pg,
            url_redacted,
            pool_size: config.pool_size.max(1),
            pool: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
        };
        let mut client = store.open()?;
        let report = crate::migrate::migrate(&mut client)?;
        tracing::info!(
            database = %store.url_redacted,
            schema_version = report.schema_version,
            applied = report.applied.len(),
            "library store: PostgreSQL"
        );
        store.check_in(client);
        Ok(store)
    }

    /// The database URL with its password hidden, for logs and health.
    pub fn url_redacted(&self) -> String {
        self.url_redacted.clone()
    }

    /// Waits up to `timeout` for a notification that a write committed (on any replica);
    /// true when one came, or when the listening connection was just (re)opened, since
    /// writes made while nobody listened may have been missed. Only a doorbell: the caller
    /// reads the change log after every wait, so a lost notification costs latency, never a
    /// change. Holds one connection of its own; meant for one follower thread.
    pub fn wait_for_change(&self, timeout: Duration) -> Result<bool> {
        let mut slot = self.listener.lock();
        let client = match slot.take() {
            Some(c) if !c.is_closed() => slot.insert(c),
            _ => {
                let mut c = self.open()?;
                c.batch_execute(&format!("LISTEN {CHANNEL}"))
                    .map_err(|e| self.err(&e))?;
                *slot = Some(c);
                return Ok(true);
            }
        };
        let waited = {
            let mut notifications = client.notifications();
            let first = notifications.timeout_iter(timeout).next();
            match first {
                Ok(Some(_)) => {
                    // Drain what else is pending, without waiting: one doorbell is enough.
                    let mut pending = notifications.iter();
                    while let Ok(Some(_)) = pending.next() {}
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            }
        };
        // `None` also means the server went away: look, so the next call reconnects.
        let result = match waited {
            Ok(false) => client.is_valid(PING_TIMEOUT).map(|()| false),
            other => other,
        };
        match result {
            Ok(woken) => Ok(woken),
            Err(e) => {
                *slot = None;
                Err(self.err(&e))
            }
        }
    }

    fn err(&self, e: &postgres::Error) -> LibraryError {
        from_pg(e, &self.at)
    }

    /// A new connection.
    fn open(&self) -> Result<Client> {
        self.config.connect(NoTls).map_err(|e| self.err(&e))
    }

    /// An idle connection from the pool (and whether it is one), else a new one.
    fn check_out(&self) -> Result<(Client, bool)> {
        loop {
            let idle = self.pool.lock().pop();
            match idle {
                Some(c) if !c.is_closed() => return Ok((c, true)),
                Some(_) => continue,
                None => return Ok((self.open()?, false)),
            }
        }
    }

    fn check_in(&self, client: Client) {
        if client.is_closed() {
            return;
        }
        let mut pool = self.pool.lock();
        if pool.len() < self.pool_size {
            pool.push(client);
            return;
        }
        drop(pool);
        // Closing talks to the server: not under the lock.
        drop(client);
    }

    /// Runs `op` on a pooled connection; runs it again (on a fresh connection, or after a
    /// short pause) when that is safe and may help:
    ///
    /// - a serialization failure or deadlock: the transaction was rolled back;
    /// - a connection error on a connection that sat idle in the pool, before any COMMIT:
    ///   a server restart or an idle timeout kills every pooled connection at once, and a
    ///   request should not fail for finding them dead.
    ///
    /// A COMMIT that fails with a connection error is never run again: whether the write
    /// committed is unknown, so the caller gets UNAVAILABLE saying so.
    ///
    /// The connection goes back to the pool unless it failed at the connection level.
    /// (No drop guard: should `op` panic, the connection is dropped, not pooled in an
    /// unknown state.)
    fn run<T>(&self, mut op: impl FnMut(&mut Client) -> Result<T, Failure>) -> Result<T> {
        let mut retries = 0u32;
        let mut reconnected = false;
        loop {
            let (mut client, reused) = self.check_out()?;
            let result = op(&mut client);
            let broken = match &result {
                Err(Failure::Pg(e) | Failure::Commit(e)) => is_connection_error(e),
                _ => false,
            };
            if broken {
                drop(client);
            } else {
                self.check_in(client);
            }
            match result {
                Ok(v) => return Ok(v),
                Err(Failure::Lib(e)) => return Err(e),
                Err(Failure::Pg(e)) => {
                    if broken && reused && !reconnected {
                        // Its pool mates are likely dead too (closed outside the lock).
                        let idle = std::mem::take(&mut *self.pool.lock());
                        drop(idle);
                        reconnected = true;
                        continue;
                    }
                    if is_retryable(&e) && retries < RETRIES {
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(5 << retries));
                        continue;
                    }
                    return Err(self.err(&e));
                }
                Err(Failure::Commit(e)) => {
                    if is_retryable(&e) && retries < RETRIES {
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(5 << retries));
                        continue;
                    }
                    if broken {
                        return Err(LibraryError::Unavailable(format!(
                            "{} failed while committing a write ({}); the write may or may \
                             not have been committed: the change log will tell",
                            self.at,
                            describe(&e)
                        )));
                    }
                    return Err(self.err(&e));
                }
            }
        }
    }

    /// Runs `op` in a read-only REPEATABLE READ transaction: every statement in it sees the
    /// same committed state.
    fn read<T>(
        &self,
        mut op: impl FnMut(&mut postgres::Transaction<'_>) -> Result<T, Failure>,
    ) -> Result<T> {
        self.run(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let out = op(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}

/// "user@host:port/dbname" (no password), for messages.
fn target(pg: &postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => pg
            .get_hostaddrs()
            .first()
            .map_or_else(|| "localhost".to_string(), |a| a.to_string()),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("");
    format!("{user}{host}:{port}/{db}")
}

/// The content address of an adapter: SHA-256 of its config JSON followed by its weights
/// (as `PeftAdapter::sha256_hex`).
fn adapter_key(adapter: &PeftAdapter) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(adapter.config_json.as_bytes());
    h.update(&adapter.safetensors);
    h.finalize().to_vec()
}

/// Capacity reserved up front for an adapter being read (the rest grows as chunks come).
const ADAPTER_PREALLOC: usize = 256 << 20;

impl LibraryStore for PgStore {
    fn kind(&self) -> &'static str {
        "postgresql"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn wait_for_change(&self, timeout: Duration) -> Result<bool> {
        PgStore::wait_for_change(self, timeout)
    }

    /// Vectors from another encoder would route nonsense: the first roe to open the
    /// database records its encoder, every later one must run the same.
    fn check_encoder(&self, encoder_id: &str) -> Result<()> {
        let stored = self.run(|client| {
            let mut tx = client.transaction()?;
            let row = tx
                .query_opt("SELECT encoder_id FROM library_meta FOR UPDATE", &[])?
                .ok_or_else(|| {
                    LibraryError::Storage(
                        "the library's database has no library_meta row: it was not set up \
                         by roe's migrations"
                            .into(),
                    )
                })?;
            let stored: Option<String> = get(&row, 0, "the encoder id")?;
            if stored.is_none() {
                tx.execute("UPDATE library_meta SET encoder_id = $1", &[&encoder_id])?;
                tx.commit().map_err(Failure::Commit)?;
            }
            Ok(stored)
        })?;
        match stored {
            Some(stored) if stored != encoder_id => Err(LibraryError::FailedPrecondition(format!(
                "the library's database was embedded with encoder {stored:?} but roe runs \
                 {encoder_id:?}; use a fresh database"
            ))),
            _ => Ok(()),
        }
    }

    fn next_point_ids(&self, n: usize) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let n = to_i64(n as u64, "n")?;
        self.run(|client| {
            client
                .query(
                    "SELECT nextval('point_ids') FROM generate_series(1::bigint, $1::bigint)",
                    &[&n],
                )?
                .iter()
                .map(|r| to_u64(get::<i64>(r, 0, "a point id")?, "point id"))
                .collect::<Result<Vec<u64>>>()
                .map_err(Failure::Lib)
        })
    }

    fn get(&self, id: &str) -> Result<Option<ExpertMeta>> {
        self.run(|client| {
            let row = client.query_opt("SELECT meta FROM experts WHERE id = $1", &[&id])?;
            Ok(row.map(|r| meta_of(&r, 0)).transpose()?)
        })
    }

    /// The current version's adapter, its chunks read in one snapshot with its record.
    fn adapter(&self, id: &str) -> Result<Option<PeftAdapter>> {
        self.read(|tx| {
            let Some(row) = tx.query_opt(
                "SELECT v.adapter_sha256, a.config_json, a.bytes \
                 FROM experts e \
                 JOIN expert_versions v ON v.expert_id = e.id AND v.version = e.current_version \
                 LEFT JOIN adapters a ON a.sha256 = v.adapter_sha256 \
                 WHERE e.id = $1",
                &[&id],
            )?
            else {
                return Ok(None);
            };
            let key: Option<Vec<u8>> = get(&row, 0, "an adapter's hash")?;
            let config_json: Option<String> = get(&row, 1, "an adapter's config")?;
            let bytes: Option<i64> = get(&row, 2, "an adapter's length")?;
            let (Some(key), Some(config_json), Some(bytes)) = (key, config_json, bytes) else {
                return Err(LibraryError::Storage(format!(
                    "the adapter of expert {id} is missing from the library's database"
                ))
                .into());
            };
            let bytes = to_u64(bytes, "adapter length")?;
            let want = usize::try_from(bytes).map_err(|_| {
                LibraryError::Storage(format!("the adapter of expert {id} is {bytes} bytes"))
            })?;
            let mut safetensors = Vec::with_capacity(want.min(ADAPTER_PREALLOC));
            let mut chunks = tx.query_raw(
                "SELECT idx, data FROM adapter_chunks WHERE sha256 = $1 ORDER BY idx",
                [&key],
            )?;
            let mut next = 0i32;
            while let Some(row) = chunks.next()? {
                let idx: i32 = get(&row, 0, "an adapter chunk's index")?;
                if idx != next {
                    return Err(LibraryError::Storage(format!(
                        "the adapter of expert {id} lacks its chunk {next}"
                    ))
                    .into());
                }
                safetensors.extend_from_slice(get::<&[u8]>(&row, 1, "an adapter chunk")?);
                next = next.saturating_add(1);
            }
            drop(chunks);
            if safetensors.len() != want {
                return Err(LibraryError::Storage(format!(
                    "the adapter of expert {id} holds {} bytes, its record says {want}",
                    safetensors.len()
                ))
                .into());
            }
            Ok(Some(PeftAdapter {
                config_json,
                safetensors,
            }))
        })
    }

    /// In id order, byte-wise (the id columns are COLLATE "C"), as sled lists them.
    fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ExpertMeta>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit_i64(limit);
        self.run(|client| {
            let rows = match after {
                Some(after) => client.query(
                    "SELECT meta FROM experts WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &limit],
                )?,
                None => client.query("SELECT meta FROM experts ORDER BY id LIMIT $1", &[&limit])?,
            };
            Ok(rows
                .iter()
                .map(|r| meta_of(r, 0))
                .collect::<Result<Vec<_>>>()?)
        })
    }

    fn len(&self) -> Result<usize> {
        let n = self.run(|client| {
            let row = client.query_one("SELECT count(*) FROM experts", &[])?;
            Ok(get::<i64>(&row, 0, "the expert count")?)
        })?;
        usize::try_from(to_u64(n, "expert count")?)
            .map_err(|_| LibraryError::Storage(format!("{n} experts")))
    }

    fn instances_of(&self, id: &str) -> Result<Vec<StoredInstance>> {
        self.run(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE expert_id = $1 \
                     ORDER BY point_id"
                ),
                &[&id],
            )?;
            Ok(rows.iter().map(instance_of).collect::<Result<Vec<_>>>()?)
        })
    }

    /// One REPEATABLE READ transaction: the head seq, every expert and every instance as of
    /// the same instant. Writers commit in seq order (the head row's lock), so that state is
    /// exactly the log applied up to the seq returned. Rows stream from the server (a large
    /// library is never held whole); once `f` has seen an item, a failure is returned
    /// rather than the snapshot started again.
    fn snapshot(&self, f: &mut dyn FnMut(SnapshotItem) -> Result<()>) -> Result<u64> {
        let mut delivered = false;
        self.run(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let result = (|| -> Result<u64, Failure> {
                let row = tx.query_one("SELECT head_seq FROM library_meta", &[])?;
                let seq = to_u64(get::<i64>(&row, 0, "the head seq")?, "seq")?;
                let mut metas = tx.query_raw(
                    "SELECT meta FROM experts ORDER BY id",
                    std::iter::empty::<i64>(),
                )?;
                while let Some(row) = metas.next()? {
                    let meta = meta_of(&row, 0)?;
                    delivered = true;
                    f(SnapshotItem::Meta(Box::new(meta)))?;
                }
                drop(metas);
                let mut rows = tx.query_raw(
                    &format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY point_id"),
                    std::iter::empty::<i64>(),
                )?;
                while let Some(row) = rows.next()? {
                    let si = instance_of(&row)?;
                    delivered = true;
                    f(SnapshotItem::Instance(si))?;
                }
                Ok(seq)
            })();
            // Read-only: ending the transaction by rollback (on drop) loses nothing, and a
            // failure to end it cannot undo what `f` saw (the connection is then dropped,
            // being closed).
            drop(tx);
            match result {
                // Not to be retried: `f` would see items twice.
                Err(Failure::Pg(e)) if delivered => Err(Failure::Lib(self.err(&e))),
                other => other,
            }
        })
    }

    fn put_expert(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        rows: &[StoredInstance],
        expect: Expect,
        quota: &Quota,
    ) -> Result<Written> {
        check_storable(meta, rows)?;
        check_config_storable(&adapter.config_json)?;
        let key = adapter_key(adapter);
        self.run(|client| {
            let tx = client.transaction()?;
            write::put(tx, meta, adapter, &key, rows, expect, quota)
        })
    }

    fn append_instances(
        &self,
        meta: &ExpertMeta,
        rows: &[StoredInstance],
        expect: Expect,
        quota: &Quota,
    ) -> Result<Written> {
        check_storable(meta, rows)?;
        self.run(|client| {
            let tx = client.transaction()?;
            write::append(tx, meta, rows, expect, quota)
        })
    }

    fn delete(&self, id: &str, expect: Expect) -> Result<Option<Written>> {
        self.run(|client| {
            let tx = client.transaction()?;
            write::delete(tx, id, expect)
        })
    }

    fn head_seq(&self) -> Result<u64> {
        let seq = self.run(|client| {
            let row = client.query_one("SELECT head_seq FROM library_meta", &[])?;
            Ok(get::<i64>(&row, 0, "the head seq")?)
        })?;
        to_u64(seq, "seq")
    }

    /// The whole log is kept: any seq can be read from.
    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A seq past bigint's range has nothing after it.
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(Vec::new());
        };
        let limit = limit_i64(limit);
        self.run(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {CHANGE_COLUMNS} FROM change_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                ),
                &[&seq, &limit],
            )?;
            Ok(rows.iter().map(change_of).collect::<Result<Vec<_>>>()?)
        })
    }

    /// The rows whose `added_seq` is the change's (a put's instances carry the put's seq,
    /// an append's rows the append's), still stored.
    fn instances_of_change(&self, change: &Change) -> Result<Vec<StoredInstance>> {
        let Ok(seq) = i64::try_from(change.seq) else {
            return Ok(Vec::new());
        };
        self.run(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances \
                     WHERE added_seq = $1 AND expert_id = $2 ORDER BY point_id"
                ),
                &[&seq, &change.expert_id],
            )?;
            Ok(rows.iter().map(instance_of).collect::<Result<Vec<_>>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_store_is_shareable() {
        assert_send_sync::<PgStore>();
    }

    #[test]
    fn targets_name_no_password() {
        let pg = postgres::Config::from_str("postgres://roe:hunter2@db.example:6543/lib").unwrap();
        assert_eq!(target(&pg), "roe@db.example:6543/lib");
    }

    #[test]
    fn configs_print_no_password() {
        let c = PgConfig::new("postgres://roe:hunter2@db/lib");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_urls_are_invalid_arguments() {
        let err =
            PgStore::connect(&PgConfig::new("postgres://roe:hunter2@db:notaport/lib")).unwrap_err();
        match &err {
            LibraryError::InvalidArgument { field, message } => {
                assert_eq!(field, "database_url");
                assert!(!message.contains("hunter2"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
