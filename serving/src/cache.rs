//! Loaded experts, bounded by the bytes of their weights (LRU), with single-flight loads:
//! concurrent requests for one expert that is not loaded yet share one load.

use std::future::Future;
use std::sync::Arc;

use moka::future::Cache;
use moka::policy::EvictionPolicy;

use crate::error::{Result, ServingError};
use crate::experts::ExpertRef;

struct Cached<E> {
    version: u64,
    sha256: String,
    bytes: usize,
    expert: Arc<E>,
}

/// A loaded expert and what it was loaded from.
pub struct Loaded<E> {
    /// The metadata read with the weights (the version they belong to).
    pub meta: ExpertRef,
    /// The size the cache charges for it.
    pub bytes: usize,
    pub expert: E,
}

pub struct ExpertCache<E> {
    entries: Cache<String, Arc<Cached<E>>>,
}

impl<E: Send + Sync + 'static> ExpertCache<E> {
    /// A cache holding at most `budget_bytes` of weights (an expert larger than the whole
    /// budget is loaded for its request and not kept).
    pub fn new(budget_bytes: u64) -> Self {
        let entries = Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|_id: &String, c: &Arc<Cached<E>>| u32::try_from(c.bytes).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Self { entries }
    }

    /// The expert `meta` names, from the cache when the cached weights are the ones `meta`
    /// describes (same version and digest), else from `load` — which runs once for all the
    /// callers that miss at the same time.
    pub async fn get_or_load(
        &self,
        meta: &ExpertRef,
        load: impl Future<Output = Result<Loaded<E>>>,
    ) -> Result<Arc<E>> {
        if let Some(c) = self.entries.get(&meta.id).await {
            if c.version == meta.version && c.sha256 == meta.weights_sha256 {
                crate::metrics::cache_lookup(true);
                return Ok(c.expert.clone());
            }
            // A new version was registered: the old weights must not answer again.
            self.entries.invalidate(&meta.id).await;
        }
        crate::metrics::cache_lookup(false);
        let cached = self
            .entries
            .try_get_with(meta.id.clone(), async {
                let loaded = load.await?;
                Ok::<_, ServingError>(Arc::new(Cached {
                    version: loaded.meta.version,
                    sha256: loaded.meta.weights_sha256,
                    bytes: loaded.bytes,
                    expert: Arc::new(loaded.expert),
                }))
            })
            .await
            .map_err(|e: Arc<ServingError>| (*e).clone())?;
        // A miss is rare: bringing the size up to date for the gauge is worth its cost.
        self.entries.run_pending_tasks().await;
        crate::metrics::cache_bytes(self.entries.weighted_size());
        Ok(cached.expert.clone())
    }

    /// Bytes of the experts kept (after pending evictions have run).
    pub async fn weighted_bytes(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.weighted_size()
    }

    /// Whether expert `id` is kept (any version).
    pub async fn contains(&self, id: &str) -> bool {
        self.entries.run_pending_tasks().await;
        self.entries.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use roe_expert_library::ExpertKind;

    use super::*;

    fn meta(id: &str, version: u64) -> ExpertRef {
        ExpertRef {
            id: id.into(),
            kind: ExpertKind::Prompt,
            backbone: "b".into(),
            version,
            weights_sha256: format!("sha{version}"),
            weights_bytes: 40,
        }
    }

    async fn load(
        cache: &ExpertCache<String>,
        m: &ExpertRef,
        bytes: usize,
        loads: &AtomicUsize,
    ) -> Arc<String> {
        cache
            .get_or_load(m, async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Loaded {
                    meta: m.clone(),
                    bytes,
                    expert: format!("{}@{}", m.id, m.version),
                })
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn bounded_in_bytes_least_recently_used_first() {
        let cache = ExpertCache::new(100);
        let loads = AtomicUsize::new(0);
        // moka applies accesses in batches; running them between steps makes the order exact.
        load(&cache, &meta("a", 1), 40, &loads).await;
        cache.weighted_bytes().await;
        load(&cache, &meta("b", 1), 40, &loads).await;
        cache.weighted_bytes().await;
        load(&cache, &meta("a", 1), 40, &loads).await; // a is now the most recent
        cache.weighted_bytes().await;
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        load(&cache, &meta("c", 1), 40, &loads).await; // evicts b
        assert!(cache.weighted_bytes().await <= 100);
        assert!(cache.contains("a").await);
        assert!(!cache.contains("b").await);
        assert!(cache.contains("c").await);
        // Larger than the whole budget: served, not kept.
        let huge = load(&cache, &meta("huge", 1), 500, &loads).await;
        assert_eq!(*huge, "huge@1");
        assert!(!cache.contains("huge").await);
        assert!(cache.weighted_bytes().await <= 100);
    }

    #[tokio::test]
    async fn a_new_version_is_loaded_and_replaces_the_old() {
        let cache = ExpertCache::new(1000);
        let loads = AtomicUsize::new(0);
        assert_eq!(*load(&cache, &meta("a", 1), 40, &loads).await, "a@1");
        assert_eq!(*load(&cache, &meta("a", 2), 40, &loads).await, "a@2");
        assert_eq!(*load(&cache, &meta("a", 2), 40, &loads).await, "a@2");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        assert_eq!(cache.weighted_bytes().await, 40);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load_and_errors_are_not_kept() {
        let cache = Arc::new(ExpertCache::<String>::new(1000));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, loads) = (cache.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                let m = meta("slow", 1);
                cache
                    .get_or_load(&m, async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Ok(Loaded {
                            meta: m.clone(),
                            bytes: 10,
                            expert: "slow".to_string(),
                        })
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(*t.await.unwrap(), "slow");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);

        let failing = cache
            .get_or_load(&meta("bad", 1), async {
                Err(ServingError::precondition("unusable adapter"))
            })
            .await;
        assert_eq!(failing.unwrap_err().message, "unusable adapter");
        assert!(!cache.contains("bad").await);
    }
}
