//! [`CachingEncoder`]: texts embedded once are not embedded again. A client routing the same
//! example queries again, or a new version registered with rows already stored, costs a
//! lookup instead of an encoder pass.
//!
//! The cache is bounded in bytes (LRU, moka) and keyed by a 128-bit digest of the encoder's
//! identity and the text, so a vector is only ever reused for the model that made it and the
//! text itself is not kept.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{counter, gauge};
use moka::sync::Cache;
use roe_expert_library::embedding::Encoder;
use roe_expert_library::Result;
use sha2::{Digest, Sha256};

pub const EMBEDDING_CACHE_HITS: &str = "roe_embedding_cache_hits_total";
pub const EMBEDDING_CACHE_MISSES: &str = "roe_embedding_cache_misses_total";
pub const EMBEDDING_CACHE_BYTES: &str = "roe_embedding_cache_bytes";

/// What one entry costs besides its vector: the key, moka's bookkeeping.
const ENTRY_OVERHEAD: u32 = 96;

type Key = [u8; 16];

/// Hits and misses so far (texts, not calls).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

pub struct CachingEncoder {
    inner: Arc<dyn Encoder>,
    cache: Cache<Key, Arc<[f32]>>,
    stats: CacheStats,
}

impl CachingEncoder {
    /// `inner` behind a cache of at most `budget_bytes` of vectors.
    pub fn new(inner: Arc<dyn Encoder>, budget_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|_k: &Key, v: &Arc<[f32]>| (v.len() * 4) as u32 + ENTRY_OVERHEAD)
            .build();
        Self {
            inner,
            cache,
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes the cache holds (after its pending evictions).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    fn key(&self, text: &str) -> Key {
        let mut h = Sha256::new();
        h.update(self.inner.id().as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        let digest = h.finalize();
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }
}

impl Encoder for CachingEncoder {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let keys: Vec<Key> = texts.iter().map(|t| self.key(t)).collect();
        let mut found: HashMap<Key, Arc<[f32]>> = HashMap::with_capacity(keys.len());
        // Each missing text embedded once, however often the batch repeats it.
        let mut missing: Vec<usize> = Vec::new();
        let mut missing_keys: HashSet<Key> = HashSet::new();
        let mut hits = 0;
        for (i, k) in keys.iter().enumerate() {
            if found.contains_key(k) {
                hits += 1;
                continue;
            }
            if missing_keys.contains(k) {
                continue;
            }
            match self.cache.get(k) {
                Some(v) => {
                    hits += 1;
                    found.insert(*k, v);
                }
                None => {
                    missing.push(i);
                    missing_keys.insert(*k);
                }
            }
        }
        let misses = texts.len() as u64 - hits;
        self.stats.hits.fetch_add(hits, Ordering::Relaxed);
        self.stats.misses.fetch_add(misses, Ordering::Relaxed);
        counter!(EMBEDDING_CACHE_HITS).increment(hits);
        counter!(EMBEDDING_CACHE_MISSES).increment(misses);
        if !missing.is_empty() {
            let batch: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let vectors = self.inner.embed(&batch)?;
            for (&i, v) in missing.iter().zip(vectors) {
                let v: Arc<[f32]> = Arc::from(v);
                self.cache.insert(keys[i], v.clone());
                found.insert(keys[i], v);
            }
            gauge!(EMBEDDING_CACHE_BYTES).set(self.cache.weighted_size() as f64);
        }
        Ok(keys
            .iter()
            .map(|k| found.get(k).map(|v| v.to_vec()).unwrap_or_default())
            .collect())
    }

    fn is_healthy(&self) -> bool {
        self.inner.is_healthy()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Embeds a text as [len, 1] normalised (roughly); counts the texts it embeds.
    struct Counting {
        id: &'static str,
        texts: AtomicUsize,
    }

    impl Encoder for Counting {
        fn id(&self) -> &str {
            self.id
        }
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
            if texts.iter().any(|t| t == "fail") {
                return Err(roe_expert_library::LibraryError::Encoder("fails".into()));
            }
            self.texts.fetch_add(texts.len(), Ordering::SeqCst);
            Ok(texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect())
        }
    }

    fn counting(id: &'static str) -> Arc<Counting> {
        Arc::new(Counting {
            id,
            texts: AtomicUsize::new(0),
        })
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn texts_embedded_once_are_served_from_the_cache() {
        let inner = counting("m");
        let enc = CachingEncoder::new(inner.clone(), 1 << 20);
        let first = enc.embed(&strings(&["a", "bb", "a"])).unwrap();
        assert_eq!(first, vec![vec![1.0, 1.0], vec![2.0, 1.0], vec![1.0, 1.0]]);
        // "a" twice in one batch is embedded once.
        assert_eq!(inner.texts.load(Ordering::SeqCst), 2);
        let again = enc.embed(&strings(&["bb", "a", "ccc"])).unwrap();
        assert_eq!(again, vec![vec![2.0, 1.0], vec![1.0, 1.0], vec![3.0, 1.0]]);
        assert_eq!(inner.texts.load(Ordering::SeqCst), 3);
        assert_eq!(enc.stats().hits.load(Ordering::SeqCst), 2);
        assert_eq!(enc.stats().misses.load(Ordering::SeqCst), 4);
        assert!(enc.embed(&[]).unwrap().is_empty());
    }

    #[test]
    fn failures_are_not_cached_and_the_budget_bounds_the_cache() {
        let inner = counting("m");
        let enc = CachingEncoder::new(inner.clone(), 10 * (8 + ENTRY_OVERHEAD as u64));
        assert!(enc.embed(&strings(&["x", "fail"])).is_err());
        enc.embed(&strings(&["x"])).unwrap();
        assert_eq!(inner.texts.load(Ordering::SeqCst), 1);
        let many: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        enc.embed(&many).unwrap();
        assert!(
            enc.weighted_bytes() <= 10 * (8 + ENTRY_OVERHEAD as u64),
            "{}",
            enc.weighted_bytes()
        );
    }

    #[test]
    fn the_key_holds_the_encoders_identity() {
        let (a, b) = (
            CachingEncoder::new(counting("a"), 1 << 20),
            CachingEncoder::new(counting("b"), 1 << 20),
        );
        assert_ne!(a.key("same text"), b.key("same text"));
        assert_eq!(a.key("same text"), a.key("same text"));
        assert_ne!(a.key("ab"), a.key("a\0b"));
    }
}
