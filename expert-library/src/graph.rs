//! The HNSW graph behind a large [`crate::index::VectorIndex`]: a usearch index over the
//! index's rows (the key of a vector is its row number), inner-product metric, vectors kept
//! in bf16.
//!
//! Why usearch, and why bf16: measured on this machine's CPUs at 100k x 384 (M=16,
//! ef_construction=100, 2 threads), hnsw_rs built in ~3-4x hnswlib's time and held its own
//! f32 copy of every vector plus pointer-rich edge lists; usearch with bf16 storage built in
//! hnswlib's time (19.5 s against 21.0 s) in about half its memory, and searched at its speed
//! (AVX-512 BF16 dot products, chosen at run time by usearch's kernels). bf16 rounding caps
//! the graph's own recall near 0.997, so the index asks the graph for a margin of candidates
//! and scores them again against its f32 rows: the hits and scores are those of an exact scan
//! whenever the graph found them.
//!
//! usearch runs each call in one of a fixed number of per-thread contexts reserved ahead and
//! fails a call that finds none free; [`Slots`] keeps callers beyond that number waiting
//! instead.

use std::path::Path;

use parking_lot::{Condvar, Mutex};
use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::index::IndexConfig;

/// Rows added per rayon task (one context taken per task, not per row).
const ADD_CHUNK: usize = 256;

/// The smallest capacity reserved: growing is a reallocation, so small graphs start roomy.
const MIN_CAPACITY: usize = 1024;

/// Contexts reserved per graph: enough for the build's threads and for concurrent searches
/// (more searches at once than this many would only queue for the cores anyway).
fn context_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores + 2).max(rayon::current_num_threads())
}

/// A counting gate: at most `n` holders at once, the others wait.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Self {
        Self {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock();
        while *free == 0 {
            self.freed.wait(&mut free);
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}

pub(crate) struct Graph {
    index: Index,
    slots: Slots,
    contexts: usize,
}

fn options(dim: usize, config: &IndexConfig) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        quantization: ScalarKind::BF16,
        connectivity: config.max_connections,
        expansion_add: config.ef_construction,
        expansion_search: config.ef_search,
        multi: false,
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("usearch {what}: {e}")
}

impl Graph {
    /// An empty graph with room for `capacity` vectors.
    pub(crate) fn new(dim: usize, config: &IndexConfig, capacity: usize) -> Result<Self, String> {
        let index = Index::new(&options(dim, config)).map_err(|e| err("index", e))?;
        let contexts = context_count();
        index
            .reserve_capacity_and_threads(capacity.max(MIN_CAPACITY), contexts)
            .map_err(|e| err("reserve", e))?;
        Ok(Self {
            index,
            slots: Slots::new(contexts),
            contexts,
        })
    }

    /// Vectors in the graph (tombstoned rows included: the index filters them).
    pub(crate) fn size(&self) -> usize {
        self.index.size()
    }

    /// Adds `rows` (row numbers, with their vectors from `vector_of`) in parallel, in chunks,
    /// growing the capacity first.
    pub(crate) fn add_rows<'a>(
        &mut self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String> {
        let needed = self.index.size() + rows.len();
        if needed > self.index.capacity() {
            let capacity = needed.max(self.index.capacity().saturating_mul(2));
            self.index
                .reserve_capacity_and_threads(capacity, self.contexts)
                .map_err(|e| err("reserve", e))?;
        }
        let (index, slots) = (&self.index, &self.slots);
        rows.par_chunks(ADD_CHUNK).try_for_each(|chunk| {
            let _slot = slots.take();
            chunk.iter().try_for_each(|&r| {
                index
                    .add(r as u64, vector_of(r))
                    .map_err(|e| err(&format!("add of row {r}"), e))
            })
        })
    }

    /// Up to `count` rows `keep` accepts, nearest first by the graph's (bf16) scores.
    pub(crate) fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<usize>, String> {
        let _slot = self.slots.take();
        let matches = self
            .index
            .filtered_search(query, count, |key| keep(key as usize))
            .map_err(|e| err("search", e))?;
        Ok(matches.keys.iter().map(|k| *k as usize).collect())
    }

    /// [`Self::search`] with no predicate: every row the graph holds may be returned.
    pub(crate) fn search_unfiltered(
        &self,
        query: &[f32],
        count: usize,
    ) -> Result<Vec<usize>, String> {
        let _slot = self.slots.take();
        let matches = self
            .index
            .search(query, count)
            .map_err(|e| err("search", e))?;
        Ok(matches.keys.iter().map(|k| *k as usize).collect())
    }

    /// The graph's copy of row `r`, widened to f32, if it holds one.
    pub(crate) fn vector(&self, r: usize, out: &mut [f32]) -> bool {
        self.index.get(r as u64, out).is_ok_and(|n| n == 1)
    }

    /// Candidates a search keeps (usearch's expansion; at least the count asked for).
    pub(crate) fn set_ef_search(&self, ef: usize) {
        self.index.change_expansion_search(ef);
    }

    pub(crate) fn connectivity(&self) -> usize {
        self.index.connectivity()
    }

    pub(crate) fn dimensions(&self) -> usize {
        self.index.dimensions()
    }

    /// Bytes usearch holds for the graph and its vectors.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }

    /// The instruction set usearch's kernels picked on this CPU.
    pub(crate) fn kernels(&self) -> String {
        self.index.hardware_acceleration()
    }

    /// Writes the graph (with its vectors) to `path`, unsynced.
    pub(crate) fn save(&self, path: &Path) -> Result<(), String> {
        let p = path.to_str().ok_or("the path is not UTF-8")?;
        self.index.save(p).map_err(|e| err("save", e))
    }

    /// Reads a graph [`Self::save`] wrote. usearch checks the file's header and length; the
    /// caller checks that the content is what was written (its checksum) and what it needs.
    pub(crate) fn load(path: &Path, dim: usize, config: &IndexConfig) -> Result<Self, String> {
        let p = path.to_str().ok_or("the path is not UTF-8")?;
        let meta = Index::metadata(p).map_err(|e| err("header", e))?;
        if meta.dimensions != dim as u64
            || meta.metric != MetricKind::IP
            || meta.quantization != ScalarKind::BF16
            || meta.multi
        {
            return Err(format!(
                "a {}-d {:?}/{:?} graph, expected {dim}-d IP/BF16",
                meta.dimensions, meta.metric, meta.quantization
            ));
        }
        let index = Index::new(&options(dim, config)).map_err(|e| err("index", e))?;
        index.load(p).map_err(|e| err("load", e))?;
        // Search and insertion settings are the configured ones, whatever the file says.
        index.change_expansion_add(config.ef_construction);
        index.change_expansion_search(config.ef_search);
        let contexts = context_count();
        index
            .reserve_capacity_and_threads(index.size().max(MIN_CAPACITY), contexts)
            .map_err(|e| err("reserve", e))?;
        Ok(Self {
            index,
            slots: Slots::new(contexts),
            contexts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_callers_than_contexts_wait_instead_of_failing() {
        let dim = 8;
        let config = IndexConfig::default();
        let mut g = Graph::new(dim, &config, 0).unwrap();
        let vectors: Vec<Vec<f32>> = (0..3000)
            .map(|i| {
                let mut v: Vec<f32> = (0..dim).map(|d| ((i * 7 + d * 13) % 17) as f32).collect();
                crate::embedding::normalize(&mut v);
                v
            })
            .collect();
        let rows: Vec<usize> = (0..vectors.len()).collect();
        // Past the initial capacity: the graph grows.
        g.add_rows(&rows, &|r| vectors[r].as_slice()).unwrap();
        assert_eq!(g.size(), 3000);
        let searchers = 4 * g.contexts;
        std::thread::scope(|s| {
            for t in 0..searchers {
                let (g, vectors) = (&g, &vectors);
                s.spawn(move || {
                    for i in 0..20 {
                        let hits = g.search(&vectors[(t * 31 + i) % 3000], 5, &|_| true);
                        assert_eq!(hits.unwrap().len(), 5);
                    }
                });
            }
        });
        let mut out = vec![0.0; dim];
        assert!(g.vector(17, &mut out));
        assert!(out
            .iter()
            .zip(&vectors[17])
            .all(|(a, b)| (a - b).abs() < 1e-2));
        assert!(!g.vector(5000, &mut out));
    }
}
