//! Routes already answered: the same queries with the same options, on a library that has not
//! changed since, get the same answer without any work (no embedding, no search, no votes).
//!
//! Keyed by a SHA-256 of the library's write count, the options and the queries, so a write
//! (register, delete, new version) makes every earlier entry unreachable at once; they age out
//! of the LRU. Bounded in bytes (moka). The key is read before routing: a route that overlaps
//! a write may be stored under the count from before it, where only requests that also began
//! before the write can find it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::retrieval::{Query, RouteOptions, RouteResult};

type Key = [u8; 32];

/// Bytes an entry costs besides its strings: moka's bookkeeping, the key, the vectors' heads.
const ENTRY_OVERHEAD: usize = 256;

pub(crate) struct RouteCache {
    cache: Cache<Key, Arc<RouteResult>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Hits and misses of the route cache so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteCacheStats {
    pub hits: u64,
    pub misses: u64,
}

fn weight(r: &RouteResult) -> u32 {
    let ranked: usize = r
        .ranked
        .iter()
        .map(|s| std::mem::size_of_val(s) + s.expert_id.len())
        .sum();
    let evidence: usize = r
        .evidence
        .iter()
        .flatten()
        .map(|h| std::mem::size_of_val(h) + h.expert_id.len())
        .sum();
    u32::try_from(ENTRY_OVERHEAD + ranked + evidence).unwrap_or(u32::MAX)
}

impl RouteCache {
    pub(crate) fn new(budget_bytes: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(budget_bytes)
                .weigher(|_k: &Key, v: &Arc<RouteResult>| weight(v))
                .build(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The key of `queries` routed with `options` on the library after `writes` writes.
    pub(crate) fn key(writes: u64, queries: &[Query], options: &RouteOptions) -> Key {
        let mut h = Sha256::new();
        h.update(writes.to_le_bytes());
        // Debug spells every field, strings quoted and escaped: distinct options or queries
        // never print alike.
        h.update(format!("{options:?}").as_bytes());
        for q in queries {
            h.update(format!("{:?}", (&q.input, &q.choices, &q.target)).as_bytes());
        }
        h.finalize().into()
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Arc<RouteResult>> {
        let found = self.cache.get(key);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::metrics::route_cache(found.is_some());
        found
    }

    pub(crate) fn insert(&self, key: Key, result: RouteResult) {
        self.cache.insert(key, Arc::new(result));
    }

    pub(crate) fn stats(&self) -> RouteCacheStats {
        RouteCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}
