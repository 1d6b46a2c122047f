//! Throwaway databases for tests (feature `testing`). Each [`TestDatabase`] is a database of
//! its own on the test server, dropped when the value is: tests run in parallel without
//! seeing each other, and leave nothing behind.
//!
//! The server is `ROE_TEST_DATABASE_URL` (a role that may CREATE DATABASE), else
//! `postgres://postgres@127.0.0.1:5432/postgres`. `./scripts/test.sh` finds or starts one
//! (a private cluster when nothing answers). A test never skips for want of a server: it
//! fails, saying how to get one.

use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};

use crate::error::{describe, redact, with_dbname};
use crate::store::{PgConfig, PgStore};

/// The variable naming the test server.
pub const URL_VAR: &str = "ROE_TEST_DATABASE_URL";

/// The test server when [`URL_VAR`] is unset.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database created for one test, dropped (its connections terminated first) on drop.
pub struct TestDatabase {
    /// The URL of the test's database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database on the test server. Panics, saying how to get a server,
    /// when none answers.
    pub fn create() -> Self {
        let admin_url = std::env::var(URL_VAR)
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
        let mut admin = connect_admin(&admin_url);
        let name = format!(
            "roe_test_{}_{}_{:016x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random()
        );
        // The name is ours (lowercase letters, digits, underscores): no quoting issues.
        if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {name}")) {
            panic!(
                "creating test database {name} on {}: {} ({URL_VAR} must name a role that may \
                 CREATE DATABASE; ./scripts/test.sh starts a private cluster that can)",
                redact(&admin_url),
                describe(&e)
            );
        }
        Self {
            url: with_dbname(&admin_url, &name),
            name,
            admin_url,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A [`PgConfig`] for this database (default pool and timeout).
    pub fn config(&self) -> PgConfig {
        PgConfig::new(self.url.clone())
    }

    /// A store on this database (migrated). Panics on failure.
    pub fn store(&self) -> PgStore {
        match PgStore::connect(&self.config()) {
            Ok(s) => s,
            Err(e) => panic!("opening a PgStore on test database {}: {e}", self.name),
        }
    }

    /// A plain connection to this database (to look at or tamper with its tables).
    pub fn client(&self) -> Client {
        connect(&self.url).unwrap_or_else(|e| {
            panic!(
                "connecting to test database {}: {}",
                self.name,
                describe(&e)
            )
        })
    }

    /// The server's TCP address, for a proxy in front of it (tests that cut the network).
    /// Panics for a server reached over a Unix socket.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        let config = postgres::Config::from_str(&self.url)
            .unwrap_or_else(|e| panic!("the test URL does not parse: {}", describe(&e)));
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => panic!(
                "the test server is not reached over TCP: {}",
                redact(&self.url)
            ),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve the test server {host}:{port}"))
    }

    /// The URL of this database reached at `addr` instead of the server's own address (a
    /// proxy in front of it); user, password and database kept.
    pub fn url_through(&self, addr: std::net::SocketAddr) -> String {
        let config = postgres::Config::from_str(&self.url)
            .unwrap_or_else(|e| panic!("the test URL does not parse: {}", describe(&e)));
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        format!(
            "postgres://{user}{password}@{}:{}/{}",
            addr.ip(),
            addr.port(),
            self.name
        )
    }

    /// A connection to the server's admin database (the one [`URL_VAR`] names): to
    /// terminate a store's sessions (`pg_terminate_backend`) and the like.
    pub fn admin_client(&self) -> Client {
        connect_admin(&self.admin_url)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let mut admin = match connect(&self.admin_url) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "could not drop test database {}: {}",
                    self.name,
                    describe(&e)
                );
                return;
            }
        };
        // FORCE terminates the sessions too; terminating first also covers servers whose
        // DROP ... WITH (FORCE) is refused for a session that reconnects in between.
        let _ = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&self.name],
        );
        if let Err(e) = admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!(
                "could not drop test database {}: {}",
                self.name,
                describe(&e)
            );
        }
    }
}

fn connect(url: &str) -> Result<Client, postgres::Error> {
    let mut config = postgres::Config::from_str(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.connect(NoTls)
}

fn connect_admin(url: &str) -> Client {
    connect(url).unwrap_or_else(|e| {
        panic!(
            "the PostgreSQL tests need a server and none answers at {} ({}). Set {URL_VAR} to \
             a server whose role may CREATE DATABASE (postgres://USER:PASSWORD@HOST:PORT/postgres), \
             or run the tests with ./scripts/test.sh, which starts a private cluster",
            redact(url),
            describe(&e)
        )
    })
}

/// Enough randomness for a name: std's per-process random hasher keys, with the time.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}
