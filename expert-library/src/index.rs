//! Maximum-inner-product index over instance embeddings.
//!
//! Vectors are unit length, so inner product = cosine and MIPS = nearest neighbour. Small
//! libraries are scanned exactly (at ~10k vectors a scan beats a graph); past
//! `hnsw_threshold` live vectors an HNSW graph ([`crate::graph`]) answers instead,
//! and its candidates are scored again against the index's own f32 rows, so a hit's score is
//! the exact one. Insertion is continual: [`VectorIndex::append`] (under the caller's write
//! lock) only stores the rows, which searches then scan exactly, and the [`GraphWork`] it
//! leaves inserts them into the graph without that lock while searches go on (the graph
//! takes insertions through `&self`); the first build past `hnsw_threshold` is graph work
//! too, installed by a short write. Deletion is a tombstone honoured at once by filtered
//! search. Once tombstones reach `compact_ratio` of the rows
//! ([`VectorIndex::needs_compaction`]) the index is compacted: tombstoned rows are dropped
//! and the graph rebuilt.
//!
//! Rebuilding a graph of a million vectors takes minutes, so `remove` never compacts: the
//! library compacts in the background ([`crate::compaction`]) in three steps that each hold
//! the caller's lock only briefly or not at all:
//! 1. [`VectorIndex::begin_compaction`] and [`VectorIndex::copy_into`] copy the live rows out,
//!    a chunk per call (a short read lock each);
//! 2. [`CompactionSnapshot::build`] builds the new index from the copy, without any lock;
//! 3. [`VectorIndex::swap_in`] (a short write lock) replays the writes made since the
//!    snapshot began — rows appended since are inserted into the new index, copied rows
//!    tombstoned since are removed from it — and replaces the index with it.
//!
//! Rows are append-only and never change, and tombstones are never lifted, so the replay
//! yields exactly the live set a synchronous [`VectorIndex::compact`] (the same three steps
//! in one go) would, with the same vectors: exact search gives the same hits.
//!
//! A graph can be written to disk ([`VectorIndex::dump_graph`]) and loaded back
//! ([`VectorIndex::load_graph`]) instead of being rebuilt; [`crate::persist`] decides when a
//! dump may be trusted.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::engine::{AnnGraph, IndexEngine};
use crate::error::{LibraryError, Result};

/// Head of a row table file (see [`VectorIndex::dump_graph`]).
const ROWS_MAGIC: &[u8; 8] = b"ROEROWS1";

/// Points a graph build inserts between two looks at its cancel flag.
const GRAPH_BATCH: usize = 4096;

/// Candidates asked of the graph beyond k. Duplicates (the same text stored by two experts)
/// tie exactly, and only with all tied candidates in hand does the id tie-break pick the
/// same one as the exact scan; the graph's bf16 scores also order near-ties differently
/// from the f32 ones that decide.
const CANDIDATE_MARGIN: usize = 16;

/// Source of [`VectorIndex`] epochs: every index, and every compaction of one, gets its own.
static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_epoch() -> u64 {
    NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Which points a search may return.
pub type Allow<'a> = dyn Fn(u64) -> bool + Sync + 'a;

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Live vectors from which on the HNSW graph answers searches instead of a full scan.
    pub hnsw_threshold: usize,
    pub max_connections: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    /// Fraction of tombstoned rows that triggers compaction.
    pub compact_ratio: f32,
    /// Which HNSW implementation builds the graph.
    pub engine: IndexEngine,
}

/// M=16 and ef_construction=100 build 1M x 384 vectors in hnswlib's time on 2 cores;
/// ef_search=192 sits between the measured 0.91 (128) and 0.98 (256) recall@10 there
/// (bench/results/hnsw.md), at ~1.4 ms a query.
impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            hnsw_threshold: 20_000,
            max_connections: 16,
            ef_construction: 100,
            ef_search: 192,
            compact_ratio: 0.25,
            engine: IndexEngine::Graph,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub point_id: u64,
    pub score: f32,
}

/// Rows per matrix product of [`VectorIndex::search_exact_many`]: the block's scores for 32
/// queries stay in the core's cache (32 x 1024 floats).
const EXACT_BLOCK_ROWS: usize = 1024;

pub struct VectorIndex {
    dim: usize,
    config: IndexConfig,
    /// Row-major vectors; row r belongs to `points[r]`.
    data: Vec<f32>,
    points: Vec<u64>,
    row_of: HashMap<u64, usize>,
    deleted: HashSet<usize>,
    /// Shared with [`GraphWork`] that inserts into it while searches go on.
    hnsw: Option<Arc<dyn AnnGraph>>,
    /// Compactions so far (a compaction replaces the graph, so a dump of it goes stale).
    compactions: u64,
    /// Identifies this index's rows: a compaction snapshot only swaps into the index (and
    /// the rows) it was taken from.
    epoch: u64,
}

/// The live rows of an index copied out for a background compaction, as of
/// [`VectorIndex::begin_compaction`] (rows appended later are replayed at the swap).
pub struct CompactionSnapshot {
    dim: usize,
    config: IndexConfig,
    /// Epoch of the index copied.
    epoch: u64,
    /// Rows the index held when the snapshot began.
    end: usize,
    /// Next row to look at.
    next: usize,
    /// The source row of each copied row, ascending.
    rows: Vec<usize>,
    points: Vec<u64>,
    data: Vec<f32>,
}

/// A compacted index built from a [`CompactionSnapshot`], private to its builder until
/// [`VectorIndex::swap_in`]; it can be dumped before ([`Self::index`]).
pub struct CompactedIndex {
    index: VectorIndex,
    source_epoch: u64,
    source_end: usize,
    /// Row `i` of `index` is row `source_rows[i]` of the source, ascending.
    source_rows: Vec<usize>,
}

/// What [`VectorIndex::swap_in`] replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapReport {
    /// Rows appended to the source since the snapshot, inserted into the new index.
    pub inserted: usize,
    /// Copied rows tombstoned since the snapshot, removed from the new index.
    pub removed: usize,
}

impl VectorIndex {
    pub fn new(dim: usize, config: IndexConfig) -> Self {
        Self {
            dim,
            config,
            data: Vec::new(),
            points: Vec::new(),
            row_of: HashMap::new(),
            deleted: HashSet::new(),
            hnsw: None,
            compactions: 0,
            epoch: next_epoch(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Changes how many candidates a graph search keeps (recall against latency), at once
    /// and for graphs built later.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.config.ef_search = ef;
        if let Some(g) = &self.hnsw {
            g.set_ef_search(ef);
        }
    }

    /// The instruction set the graph's distance kernels use, when there is a graph.
    pub fn graph_kernels(&self) -> Option<String> {
        self.hnsw.as_deref().map(|g| g.kernels())
    }

    /// How many times [`Self::compact`] has dropped tombstoned rows.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// Live (not deleted) point ids, in row order.
    pub fn live_points(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.points.len())
            .filter(|r| !self.deleted.contains(r))
            .map(|r| self.points[r])
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live (not deleted) vectors.
    pub fn len(&self) -> usize {
        self.points.len() - self.deleted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn uses_hnsw(&self) -> bool {
        self.hnsw.is_some()
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.dim..(r + 1) * self.dim]
    }

    /// Adds vectors (a point id already present is replaced) and inserts them into the
    /// graph, or builds the graph when they take the index past `hnsw_threshold`, before
    /// returning: [`Self::append`] then [`GraphWork::run`] in one go.
    pub fn insert(&mut self, items: &[(u64, &[f32])]) -> Result<()> {
        self.append(items)?;
        self.settle_graph();
        Ok(())
    }

    /// Runs the graph work due now, under the caller's `&mut` (start-up, tests, a
    /// synchronous compaction): as [`Self::graph_work`] would, on the index's own rows
    /// instead of a copy.
    pub fn settle_graph(&mut self) {
        let Some((from, graph)) = self.graph_due() else {
            return;
        };
        let rows = self.rows_from(from);
        if rows.is_empty() {
            return;
        }
        let (data, dim) = (&self.data, self.dim);
        let vector_of = |r: usize| &data[r * dim..(r + 1) * dim];
        if let Some(graph) = add_to_graph(graph.as_deref(), dim, &self.config, &rows, &vector_of) {
            self.hnsw = Some(Arc::from(graph));
        }
    }

    /// Where graph work would start, and the graph it would insert into (none: a build).
    fn graph_due(&self) -> Option<(usize, Option<Arc<dyn AnnGraph>>)> {
        match &self.hnsw {
            Some(graph) => Some((graph.complete_below(), Some(graph.clone()))),
            None if self.len() >= self.config.hnsw_threshold => Some((0, None)),
            None => None,
        }
    }

    /// Live rows from `from` on.
    fn rows_from(&self, from: usize) -> Vec<usize> {
        (from..self.points.len())
            .filter(|r| !self.deleted.contains(r))
            .collect()
    }

    /// Adds vectors (a point id already present is replaced) without touching the graph:
    /// searches find them at once by scanning the rows past the graph's
    /// ([`Graph::complete_below`]) exactly, until [`Self::graph_work`] run off the caller's
    /// lock has put them in the graph.
    pub fn append(&mut self, items: &[(u64, &[f32])]) -> Result<()> {
        for (pid, v) in items {
            if v.len() != self.dim {
                return Err(LibraryError::Index(format!(
                    "vector of point {pid} has {} dimensions, the index {}",
                    v.len(),
                    self.dim
                )));
            }
        }
        for (pid, v) in items {
            if let Some(old) = self.row_of.get(pid) {
                self.deleted.insert(*old);
            }
            let r = self.points.len();
            self.points.push(*pid);
            self.data.extend_from_slice(v);
            self.row_of.insert(*pid, r);
        }
        Ok(())
    }

    /// The graph work due after appends, to run without the caller's lock: inserting the
    /// live rows past the graph's into it, or building the graph once the index has
    /// `hnsw_threshold` live vectors. It carries a copy of the vectors it needs.
    pub fn graph_work(&self) -> Option<GraphWork> {
        let (from, graph) = self.graph_due()?;
        let rows = self.rows_from(from);
        if rows.is_empty() {
            return None;
        }
        let mut data = Vec::with_capacity(rows.len() * self.dim);
        for &r in &rows {
            data.extend_from_slice(self.row(r));
        }
        Some(GraphWork {
            graph,
            dim: self.dim,
            config: self.config.clone(),
            epoch: self.epoch,
            rows,
            data,
        })
    }

    /// Makes a graph [`GraphWork::run`] built this index's graph, unless the index got one
    /// or was compacted meanwhile. Rows appended since the work was taken are scanned
    /// exactly until the next work inserts them.
    pub fn install_graph(&mut self, built: BuiltGraph) -> bool {
        if built.epoch != self.epoch || self.hnsw.is_some() {
            return false;
        }
        self.hnsw = Some(Arc::from(built.graph));
        true
    }

    /// Tombstones points; searches skip them from now on. Never compacts (see the module
    /// docs): the caller checks [`Self::needs_compaction`].
    pub fn remove(&mut self, point_ids: &[u64]) {
        for pid in point_ids {
            if let Some(r) = self.row_of.remove(pid) {
                self.deleted.insert(r);
            }
        }
    }

    /// Tombstoned rows reached `compact_ratio` of all rows.
    pub fn needs_compaction(&self) -> bool {
        !self.deleted.is_empty()
            && self.deleted.len() as f32 / self.points.len() as f32 >= self.config.compact_ratio
    }

    /// Tombstoned rows, waiting for a compaction.
    pub fn tombstones(&self) -> usize {
        self.deleted.len()
    }

    /// Drops tombstoned rows and rebuilds the graph (or drops it when the index got small),
    /// synchronously: the background compaction's steps in one go.
    pub fn compact(&mut self) {
        if self.deleted.is_empty() {
            return;
        }
        let mut snapshot = self.begin_compaction();
        self.copy_into(&mut snapshot, usize::MAX);
        let Some(compacted) = snapshot.build(&|| false) else {
            return;
        };
        if let Err(e) = self.swap_in(compacted) {
            // Not reachable: the snapshot was taken from this index just now.
            tracing::error!("synchronous compaction could not swap in: {e}");
        }
        self.settle_graph();
    }

    /// Starts a compaction snapshot of this index; fill it with [`Self::copy_into`].
    pub fn begin_compaction(&self) -> CompactionSnapshot {
        CompactionSnapshot {
            dim: self.dim,
            config: self.config.clone(),
            epoch: self.epoch,
            end: self.points.len(),
            next: 0,
            rows: Vec::with_capacity(self.len()),
            points: Vec::with_capacity(self.len()),
            data: Vec::with_capacity(self.len() * self.dim),
        }
    }

    /// Copies the live rows among the next `max_rows` rows of `snapshot` into it; true once
    /// the snapshot is complete. A snapshot of another index (or of this one before a
    /// compaction replaced its rows) is refused: it reports complete and [`Self::swap_in`]
    /// will refuse it too.
    pub fn copy_into(&self, snapshot: &mut CompactionSnapshot, max_rows: usize) -> bool {
        if snapshot.epoch != self.epoch {
            return true;
        }
        let to = snapshot.next.saturating_add(max_rows).min(snapshot.end);
        for r in snapshot.next..to {
            if !self.deleted.contains(&r) {
                snapshot.rows.push(r);
                snapshot.points.push(self.points[r]);
                snapshot.data.extend_from_slice(self.row(r));
            }
        }
        snapshot.next = to;
        to == snapshot.end
    }

    /// Replaces this index with `compacted` after replaying the writes made since its
    /// snapshot began (see the module docs). Refused when `compacted` was not built from
    /// this index's rows (the index is left as it was).
    pub fn swap_in(&mut self, compacted: CompactedIndex) -> Result<SwapReport> {
        let CompactedIndex {
            index: mut new,
            source_epoch,
            source_end,
            source_rows,
        } = compacted;
        if source_epoch != self.epoch || source_end > self.points.len() {
            return Err(LibraryError::Index(
                "a compaction was built from other rows than the index holds".into(),
            ));
        }
        let mut report = SwapReport::default();
        // Copied rows tombstoned since: the same row (and point) of the new index goes.
        let mut gone: Vec<u64> = Vec::new();
        for r in self.deleted.iter().filter(|r| **r < source_end) {
            if let Ok(i) = source_rows.binary_search(r) {
                gone.push(new.points[i]);
            }
        }
        report.removed = gone.len();
        new.remove(&gone);
        // Rows appended since, live ones only, in order (a point appended twice keeps its
        // last row, as here).
        let appended: Vec<(u64, &[f32])> = (source_end..self.points.len())
            .filter(|r| !self.deleted.contains(r))
            .map(|r| (self.points[r], self.row(r)))
            .collect();
        report.inserted = appended.len();
        // Into the new graph off the caller's lock, by the caller's next graph work.
        new.append(&appended)?;
        new.compactions = self.compactions + 1;
        *self = new;
        Ok(report)
    }

    /// Builds the graph over the live rows, in batches, giving up (and leaving no graph) as
    /// soon as `cancelled` says so; false when it gave up. A graph that cannot be built
    /// leaves no graph either (searches scan exactly), logged.
    fn build_hnsw_unless(&mut self, cancelled: &(dyn Fn() -> bool + Sync)) -> bool {
        self.hnsw = None;
        let live = self.rows_from(0);
        let (data, dim) = (&self.data, self.dim);
        let vector_of = |r: usize| &data[r * dim..(r + 1) * dim];
        let built = in_background(|| build_graph(dim, &self.config, &live, &vector_of, cancelled));
        match built {
            Build::Cancelled => false,
            Build::Failed => true,
            Build::Built(graph) => {
                self.hnsw = Some(Arc::from(graph));
                true
            }
        }
    }

    /// The `k` live points most similar to `query` among those `allow` accepts, best first,
    /// ties broken by point id. Uses HNSW when built, else an exact scan.
    pub fn search(&self, query: &[f32], k: usize, allow: &Allow<'_>) -> Vec<Hit> {
        let graph = match &self.hnsw {
            Some(g) if k > 0 && query.len() == self.dim => g,
            _ => return self.search_exact(query, k, allow),
        };
        // Most indexes have no tombstones: no hashing per candidate then.
        let no_tombstones = self.deleted.is_empty();
        let keep = |r: usize| {
            (no_tombstones || !self.deleted.contains(&r))
                && self.points.get(r).is_some_and(|p| allow(*p))
        };
        // Rows past the graph's (appended, not yet inserted) are scanned exactly; the graph
        // may already return some of them, which the scan covers.
        let tail = graph.complete_below().min(self.points.len());
        match self.graph_candidates(&**graph, query, k, &keep) {
            Ok(rows) => {
                let mut hits: Vec<Hit> = rows
                    .into_iter()
                    .filter(|r| *r < tail)
                    .chain((tail..self.points.len()).filter(|r| keep(*r)))
                    .map(|r| Hit {
                        point_id: self.points[r],
                        score: crate::embedding::dot(query, self.row(r)),
                    })
                    .collect();
                sort_hits(&mut hits);
                hits.truncate(k);
                hits
            }
            Err(e) => {
                tracing::error!("graph search failed, scanning instead: {e}");
                self.search_exact(query, k, allow)
            }
        }
    }

    /// The graph's best rows that `keep` accepts: `k` plus a margin when there are that many.
    /// First searched without the predicate and filtered afterwards, which leaves the same
    /// rows whenever enough of them pass (the graph visits the same nodes either way) and
    /// asks `keep` (a hash lookup or two) about a few dozen rows instead of about every node
    /// the search reaches; searched again with the predicate when too few pass.
    fn graph_candidates(
        &self,
        graph: &dyn AnnGraph,
        query: &[f32],
        k: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> std::result::Result<Vec<usize>, String> {
        let count = k + CANDIDATE_MARGIN;
        let mut rows = graph.search_unfiltered(query, count)?;
        let found = rows.len();
        rows.retain(|r| keep(*r));
        // Enough margin left for the f32 rescoring to reorder bf16 near-ties.
        if rows.len() >= k + CANDIDATE_MARGIN / 2 || (found < count && rows.len() == found) {
            return Ok(rows);
        }
        graph.search(query, count, keep)
    }

    /// Exact top-k by a full scan, whatever the index size (the ground truth for HNSW).
    pub fn search_exact(&self, query: &[f32], k: usize, allow: &Allow<'_>) -> Vec<Hit> {
        if k == 0 {
            return Vec::new();
        }
        // A bounded min-heap would save little at these k; a partial sort keeps it simple.
        let mut hits: Vec<Hit> = (0..self.points.len())
            .filter(|r| !self.deleted.contains(r) && allow(self.points[*r]))
            .map(|r| Hit {
                point_id: self.points[r],
                score: crate::embedding::dot(query, self.row(r)),
            })
            .collect();
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, cmp_hits);
            hits.truncate(k);
        }
        sort_hits(&mut hits);
        hits
    }

    /// [`Self::search`] for several queries (the Q queries of one Route): the graph's
    /// searches run on all cores at once when a graph is built, else
    /// [`Self::search_exact_many`].
    pub fn search_many(&self, queries: &[&[f32]], k: usize, allow: &Allow<'_>) -> Vec<Vec<Hit>> {
        match &self.hnsw {
            Some(_) => queries
                .par_iter()
                .map(|q| self.search(q, k, allow))
                .collect(),
            None => self.search_exact_many(queries, k, allow),
        }
    }

    /// [`Self::search_exact`] for several queries in one pass: the rows `allow` accepts are
    /// found once (not once per query), and their similarities to every query come from one
    /// matrix product per block of rows (gemm, on the stored rows in place), which reads each
    /// stored vector once for all the queries. The candidates are then scored again with [`crate::embedding::dot`], so
    /// the hits, their order and their scores are those of [`Self::search_exact`] (the
    /// product's different summation order only decides which candidates, with a margin).
    pub fn search_exact_many(
        &self,
        queries: &[&[f32]],
        k: usize,
        allow: &Allow<'_>,
    ) -> Vec<Vec<Hit>> {
        if k == 0 || queries.is_empty() {
            return vec![Vec::new(); queries.len()];
        }
        let dim = self.dim;
        if queries.iter().any(|q| q.len() != dim) {
            return queries
                .iter()
                .map(|q| self.search_exact(q, k, allow))
                .collect();
        }
        let n = self.points.len();
        let allowed: Vec<bool> = (0..n)
            .map(|r| !self.deleted.contains(&r) && allow(self.points[r]))
            .collect();
        let nq = queries.len();
        let lhs: Vec<f32> = queries.iter().flat_map(|q| q.iter().copied()).collect();
        // Near-ties at the cut are settled by the exact scores below.
        let keep = k + 16;
        let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::with_capacity(2 * keep); nq];
        let mut scores = Vec::new();
        let mut gathered: Vec<f32> = Vec::new();
        let mut ids: Vec<usize> = Vec::new();
        for start in (0..n).step_by(EXACT_BLOCK_ROWS) {
            let end = (start + EXACT_BLOCK_ROWS).min(n);
            ids.clear();
            ids.extend((start..end).filter(|&r| allowed[r]));
            if ids.is_empty() {
                continue;
            }
            // A block mostly allowed is read in place; one a filter mostly leaves out (the
            // instances without choices, say) has its allowed rows copied together first.
            let block: &[f32] = if 2 * ids.len() >= end - start {
                ids.clear();
                ids.extend(start..end);
                &self.data[start * dim..end * dim]
            } else {
                gathered.clear();
                for &r in &ids {
                    gathered.extend_from_slice(self.row(r));
                }
                &gathered
            };
            let rows = ids.len();
            scores.clear();
            scores.resize(nq * rows, 0.0f32);
            // SAFETY: lhs is nq x dim, block is rows x dim (read as its transpose, dim x
            // rows), scores is nq x rows; all row-major, all in bounds.
            unsafe {
                gemm::gemm(
                    nq,
                    rows,
                    dim,
                    scores.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    dim as isize,
                    block.as_ptr(),
                    dim as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (q, best) in best.iter_mut().enumerate() {
                let row_scores = &scores[q * rows..(q + 1) * rows];
                best.extend(
                    row_scores
                        .iter()
                        .copied()
                        .zip(ids.iter().copied())
                        .filter(|(_, r)| allowed[*r]),
                );
                if best.len() > keep {
                    // Best first, ties by point id, as the hits are ordered.
                    best.select_nth_unstable_by(keep - 1, |a, b| {
                        b.0.total_cmp(&a.0)
                            .then_with(|| self.points[a.1].cmp(&self.points[b.1]))
                    });
                    best.truncate(keep);
                }
            }
        }
        queries
            .iter()
            .zip(best)
            .map(|(q, candidates)| {
                let mut hits: Vec<Hit> = candidates
                    .into_iter()
                    .map(|(_, r)| Hit {
                        point_id: self.points[r],
                        score: crate::embedding::dot(q, self.row(r)),
                    })
                    .collect();
                sort_hits(&mut hits);
                hits.truncate(k);
                hits
            })
            .collect()
    }

    /// Writes the graph into `dir` (`<basename>.hnsw`: the graph and its bf16
    /// vectors, [`crate::graph`]'s format) plus the row table `<basename>.rows` (the point id of every row and whether it
    /// is tombstoned: graph keys are rows). Returns the files written, or `None` when there is
    /// no graph (or an empty one) to write. The graph file is not synced: the caller does.
    pub fn dump_graph(&self, dir: &Path, basename: &str) -> Result<Option<Vec<PathBuf>>> {
        let Some(graph) = &self.hnsw else {
            return Ok(None);
        };
        // Rows appended and not yet in the graph go in first: the file holds every live row.
        let pending = self.rows_from(graph.complete_below());
        if !pending.is_empty() {
            add_to_graph(Some(&**graph), self.dim, &self.config, &pending, &|r| {
                self.row(r)
            });
        }
        if graph.size() == 0 {
            return Ok(None);
        }
        let mut files = graph.save(dir, basename).map_err(|e| {
            LibraryError::Index(format!(
                "dumping the {} graph {basename} to {}: {e}",
                graph.engine(),
                dir.display()
            ))
        })?;
        let rows_path = dir.join(format!("{basename}.rows"));
        let write_rows = || -> std::io::Result<()> {
            let mut out = BufWriter::new(std::fs::File::create(&rows_path)?);
            out.write_all(ROWS_MAGIC)?;
            out.write_all(&(self.points.len() as u64).to_le_bytes())?;
            out.write_all(&(self.dim as u64).to_le_bytes())?;
            for (r, pid) in self.points.iter().enumerate() {
                out.write_all(&pid.to_le_bytes())?;
                out.write_all(&[self.deleted.contains(&r) as u8])?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()
        };
        write_rows().map_err(|e| LibraryError::io(&rows_path, e))?;
        files.push(rows_path);
        Ok(Some(files))
    }

    /// Loads a graph written by [`Self::dump_graph`]. The vectors of live rows come from
    /// `stored` (the store is the source of truth) and the graph's bf16 copy of each must be
    /// that vector rounded; every live point of `stored` must have a row in the graph, and
    /// nothing else may be live. The files must be the ones that were written (checksums are
    /// the caller's job): the graph's loader checks its structure, not its content.
    pub fn load_graph(
        dim: usize,
        config: IndexConfig,
        dir: &Path,
        basename: &str,
        stored: &HashMap<u64, &[f32]>,
    ) -> Result<Self> {
        let bad = |m: String| LibraryError::Index(format!("graph {basename}: {m}"));
        let rows_path = dir.join(format!("{basename}.rows"));
        let (points, deleted) = read_rows(&rows_path, dim).map_err(bad)?;
        let n = points.len();
        let mut data = vec![0.0f32; n * dim];
        let mut row_of = HashMap::with_capacity(n - deleted.len());
        for (r, pid) in points.iter().enumerate() {
            if deleted.contains(&r) {
                continue;
            }
            let v = stored
                .get(pid)
                .ok_or_else(|| bad(format!("point {pid} is not in the store")))?;
            if v.len() != dim {
                return Err(bad(format!("point {pid} has {} dimensions", v.len())));
            }
            data[r * dim..(r + 1) * dim].copy_from_slice(v);
            if row_of.insert(*pid, r).is_some() {
                return Err(bad(format!("point {pid} is live in two rows")));
            }
        }
        if row_of.len() != stored.len() {
            return Err(bad(format!(
                "{} live rows, the store holds {} points",
                row_of.len(),
                stored.len()
            )));
        }
        let graph = crate::engine::load_graph(config.engine, dir, basename, dim, &config, n)
            .map_err(bad)?;
        if graph.dimensions() != dim || graph.connectivity() != config.max_connections {
            return Err(bad(format!(
                "built with {} dimensions and M={}, configured {dim} and M={}",
                graph.dimensions(),
                graph.connectivity(),
                config.max_connections
            )));
        }
        if graph.size() > n {
            return Err(bad(format!("{} graph vectors for {n} rows", graph.size())));
        }
        // Every live row is in the graph, once, as the stored vector (rounded to bf16 where
        // the engine stores bf16).
        let seen: Vec<std::sync::atomic::AtomicBool> = (0..n)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect();
        graph
            .check_vectors(&|r, copy| {
                let Some(first) = seen.get(r) else {
                    return Err(format!("row {r} of {n}"));
                };
                if first.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    return Err(format!("row {r} twice"));
                }
                if deleted.contains(&r) {
                    return Ok(());
                }
                let want = &data[r * dim..(r + 1) * dim];
                if copy.len() != dim || !copy.iter().zip(want).all(|(a, b)| rounds_to(*b, *a)) {
                    return Err(format!(
                        "the graph's vector of point {} differs from the stored one",
                        points[r]
                    ));
                }
                Ok(())
            })
            .map_err(bad)?;
        if let Some(r) = (0..n)
            .find(|r| !deleted.contains(r) && !seen[*r].load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(bad(format!(
                "point {} is missing from the graph",
                points[r]
            )));
        }
        Ok(Self {
            dim,
            config,
            data,
            points,
            row_of,
            deleted,
            hnsw: Some(Arc::from(graph)),
            compactions: 0,
            epoch: next_epoch(),
        })
    }

    /// The engine of the graph, when there is one.
    pub fn graph_engine(&self) -> Option<IndexEngine> {
        self.hnsw.as_deref().map(|g| g.engine())
    }

    /// Live points the graph holds that no graph search can reach (empty for a sound
    /// graph; an index without a graph has none).
    pub fn unreachable_points(&self) -> Vec<u64> {
        let Some(graph) = &self.hnsw else {
            return Vec::new();
        };
        graph
            .unreachable_rows()
            .into_iter()
            .filter(|r| *r < self.points.len() && !self.deleted.contains(r))
            .map(|r| self.points[r])
            .collect()
    }

    /// Bytes held by vectors and bookkeeping, plus the graph's own.
    pub fn approx_memory_bytes(&self) -> usize {
        let vectors = self.data.len() * 4;
        let book = self.points.len() * (8 + 8 + 16);
        let graph = self.hnsw.as_deref().map_or(0, |g| g.memory_bytes());
        vectors + book + graph
    }
}

/// `copy` is `value` stored in bf16 (8 significant bits, so within 2^-8 relative, with a
/// little slack for rounding modes and subnormals).
fn rounds_to(value: f32, copy: f32) -> bool {
    (value - copy).abs() <= value.abs() / 128.0 + 1e-30
}

impl CompactionSnapshot {
    /// Live rows copied so far.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Builds the compacted index from the copied rows (needs no lock on the source); `None`
    /// when `cancelled` said so during the graph build.
    pub fn build(self, cancelled: &(dyn Fn() -> bool + Sync)) -> Option<CompactedIndex> {
        let mut index = VectorIndex::new(self.dim, self.config);
        index.row_of = self
            .points
            .iter()
            .enumerate()
            .map(|(r, p)| (*p, r))
            .collect();
        index.points = self.points;
        index.data = self.data;
        if index.len() >= index.config.hnsw_threshold && !index.build_hnsw_unless(cancelled) {
            return None;
        }
        Some(CompactedIndex {
            index,
            source_epoch: self.epoch,
            source_end: self.end,
            source_rows: self.rows,
        })
    }
}

impl CompactedIndex {
    /// The new index as built (before any replay), e.g. to dump it while it is private.
    pub fn index(&self) -> &VectorIndex {
        &self.index
    }
}

/// Graph work taken from an index under its owner's lock and run without it
/// ([`VectorIndex::graph_work`]): searches go on meanwhile.
pub struct GraphWork {
    /// The graph to insert into; none: build one.
    graph: Option<Arc<dyn AnnGraph>>,
    dim: usize,
    config: IndexConfig,
    epoch: u64,
    /// Rows to add, ascending, and their vectors, row after row.
    rows: Vec<usize>,
    data: Vec<f32>,
}

/// A graph [`GraphWork::run`] built, for [`VectorIndex::install_graph`].
pub struct BuiltGraph {
    graph: Box<dyn AnnGraph>,
    epoch: u64,
}

impl GraphWork {
    /// Rows it adds.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Inserts the rows into the index's graph (visible to searches as it goes), or builds
    /// a new graph of them to install. A failure is logged: the rows stay covered by the
    /// index's exact scan of rows past the graph's.
    pub fn run(self) -> Option<BuiltGraph> {
        let dim = self.dim;
        let vector_of = |r: usize| match self.rows.binary_search(&r) {
            Ok(i) => &self.data[i * dim..(i + 1) * dim],
            Err(_) => &[][..],
        };
        let graph = in_background(|| {
            add_to_graph(
                self.graph.as_deref(),
                dim,
                &self.config,
                &self.rows,
                &vector_of,
            )
        })?;
        Some(BuiltGraph {
            graph,
            epoch: self.epoch,
        })
    }
}

/// Runs `work` on the threads graph work and compactions use, apart from rayon's global
/// pool, where routes search their queries in parallel: in one pool a route's searches
/// queued behind every insertion task a registration had split its rows into. One core
/// fewer than the machine has, so routes always find one: at 200k vectors on 2 cores, Route
/// p99 while experts register was 2.0x idle with both cores, 1.5x with one, and a
/// registration of 1,000 instances took 1.19 s and 1.32 s (bench/results/startup-200k.md).
fn in_background<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.saturating_sub(1).max(1);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("roe-graph-{i}"))
            .build()
            .map_err(|e| tracing::warn!("no graph thread pool ({e}): graph work shares rayon's"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// Adds `rows` to `graph`, or builds a new graph of them (returned) when there is none.
/// Failures are logged: the rows stay covered by the index's exact scan of rows past the
/// graph's, and a failed build leaves no graph.
fn add_to_graph<'a>(
    graph: Option<&dyn AnnGraph>,
    dim: usize,
    config: &IndexConfig,
    rows: &[usize],
    vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
) -> Option<Box<dyn AnnGraph>> {
    if let Some(graph) = graph {
        if let Err(e) = graph.add_rows(rows, vector_of) {
            tracing::error!(rows = rows.len(), "the graph refused new rows: {e}");
        }
        return None;
    }
    match build_graph(dim, config, rows, vector_of, &|| false) {
        Build::Built(graph) => Some(graph),
        Build::Failed | Build::Cancelled => None,
    }
}

/// What [`build_graph`] gave.
enum Build {
    Built(Box<dyn AnnGraph>),
    /// Logged; the rows stay covered by the exact scan.
    Failed,
    Cancelled,
}

/// A new graph of the configured engine over `rows`, inserted in batches, giving up as soon
/// as `cancelled` says so.
fn build_graph<'a>(
    dim: usize,
    config: &IndexConfig,
    rows: &[usize],
    vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Build {
    let graph = match crate::engine::new_graph(config.engine, dim, config, rows.len()) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("no graph for {} vectors: {e}", rows.len());
            return Build::Failed;
        }
    };
    for batch in rows.chunks(GRAPH_BATCH) {
        if cancelled() {
            return Build::Cancelled;
        }
        if let Err(e) = graph.add_rows(batch, vector_of) {
            tracing::error!("no graph for {} vectors: {e}", rows.len());
            return Build::Failed;
        }
    }
    tracing::debug!(
        vectors = rows.len(),
        engine = %graph.engine(),
        kernels = %graph.kernels(),
        "built an HNSW graph"
    );
    Build::Built(graph)
}

/// Reads a row table: the point id of each row and the tombstoned rows.
fn read_rows(path: &Path, dim: usize) -> std::result::Result<(Vec<u64>, HashSet<usize>), String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let head = bytes.get(..24).ok_or("row table too short")?;
    if &head[..8] != ROWS_MAGIC {
        return Err("not a row table".into());
    }
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
    let (n, file_dim) = (u64_at(8), u64_at(16));
    if file_dim != dim as u64 {
        return Err(format!(
            "row table for {file_dim} dimensions, the index has {dim}"
        ));
    }
    let body = &bytes[24..];
    if n.checked_mul(9) != Some(body.len() as u64) {
        return Err(format!("row table of {n} rows has {} bytes", body.len()));
    }
    let mut points = Vec::with_capacity(n as usize);
    let mut deleted = HashSet::new();
    for (r, row) in body.chunks_exact(9).enumerate() {
        let mut pid = [0u8; 8];
        pid.copy_from_slice(&row[..8]);
        points.push(u64::from_le_bytes(pid));
        match row[8] {
            0 => {}
            1 => {
                deleted.insert(r);
            }
            f => return Err(format!("row {r} has flag {f}")),
        }
    }
    Ok((points, deleted))
}

fn cmp_hits(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| a.point_id.cmp(&b.point_id))
}

/// Best first, ties by point id.
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(cmp_hits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_unit(rng: &mut impl Rng, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() - 0.5).collect();
        crate::embedding::normalize(&mut v);
        v
    }

    #[test]
    fn many_queries_at_once_find_what_each_finds_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let dim = 48;
        let mut vs: Vec<Vec<f32>> = (0..2500).map(|_| random_unit(&mut rng, dim)).collect();
        // Duplicates tie exactly: the id tie-break must pick the same ones.
        for i in 0..40 {
            vs[2000 + i] = vs[7].clone();
        }
        let mut idx = VectorIndex::new(dim, IndexConfig::default());
        let items: Vec<(u64, &[f32])> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        idx.insert(&items).unwrap();
        idx.remove(&[3, 7, 2001]);
        let queries: Vec<Vec<f32>> = (0..33)
            .map(|i| match i {
                0 => vs[7].clone(),
                _ => random_unit(&mut rng, dim),
            })
            .collect();
        let qs: Vec<&[f32]> = queries.iter().map(Vec::as_slice).collect();
        for (k, allow) in [
            (1usize, &(|_: u64| true) as &Allow<'_>),
            (10, &|p: u64| !p.is_multiple_of(3)),
            (50, &|_: u64| true),
            (3000, &|p: u64| p < 100),
        ] {
            let many = idx.search_exact_many(&qs, k, allow);
            for (q, got) in qs.iter().zip(&many) {
                assert_eq!(got, &idx.search_exact(q, k, allow), "k={k}");
            }
        }
        assert!(idx
            .search_exact_many(&qs, 0, &|_| true)
            .iter()
            .all(Vec::is_empty));
        assert!(idx.search_exact_many(&[], 5, &|_| true).is_empty());
    }

    #[test]
    fn exact_search_finds_itself_and_honours_deletes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vs: Vec<Vec<f32>> = (0..200).map(|_| random_unit(&mut rng, 16)).collect();
        let mut idx = VectorIndex::new(16, IndexConfig::default());
        let items: Vec<(u64, &[f32])> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        idx.insert(&items).unwrap();
        let hits = idx.search(&vs[42], 3, &|_| true);
        assert_eq!(hits[0].point_id, 42);
        assert!((hits[0].score - 1.0).abs() < 1e-5);
        assert!(hits[0].score >= hits[1].score && hits[1].score >= hits[2].score);
        idx.remove(&[42]);
        assert_eq!(idx.len(), 199);
        assert_ne!(idx.search(&vs[42], 1, &|_| true)[0].point_id, 42);
        assert!(idx
            .search(&vs[7], 5, &|p| p % 2 == 1)
            .iter()
            .all(|h| h.point_id % 2 == 1));
    }

    #[test]
    fn hnsw_agrees_with_exact_search_and_survives_compaction() {
        for engine in IndexEngine::ALL {
            hnsw_agrees_with_exact_search_and_survives_compaction_on(engine);
        }
    }

    fn hnsw_agrees_with_exact_search_and_survives_compaction_on(engine: IndexEngine) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let dim = 32;
        let vs: Vec<Vec<f32>> = (0..3000).map(|_| random_unit(&mut rng, dim)).collect();
        let cfg = IndexConfig {
            hnsw_threshold: 1000,
            engine,
            ..Default::default()
        };
        let mut idx = VectorIndex::new(dim, cfg);
        let items: Vec<(u64, &[f32])> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        idx.insert(&items[..1500]).unwrap();
        assert!(idx.uses_hnsw());
        // Continual insertion into the live graph.
        idx.insert(&items[1500..]).unwrap();
        // A stored vector queried against itself: dot may round above 1 and must not panic.
        let hits = idx.search(&vs[2999], 1, &|_| true);
        assert_eq!(hits[0].point_id, 2999);
        let mut agree = 0;
        for q in 0..100 {
            let query = random_unit(&mut rng, dim);
            let a = idx.search(&query, 1, &|_| true);
            let b = idx.search_exact(&query, 1, &|_| true);
            agree += (a[0].point_id == b[0].point_id) as usize;
            let _ = q;
        }
        assert!(
            agree >= 95,
            "HNSW top-1 agreed with exact search {agree}/100 times"
        );
        // Filters: a permissive one is applied after the graph search, a strict one (too few
        // pass among the unfiltered candidates) in it; either way only accepted points, k of
        // them, mostly the exact search's.
        for (allow, name) in [
            (&(|p: u64| p % 10 != 3) as &Allow<'_>, "nine in ten"),
            (&|p: u64| p.is_multiple_of(50), "one in fifty"),
        ] {
            let mut agree = 0;
            for _ in 0..50 {
                let query = random_unit(&mut rng, dim);
                let a = idx.search(&query, 5, allow);
                assert_eq!(a.len(), 5, "{name}");
                assert!(a.iter().all(|h| allow(h.point_id)), "{name}");
                agree += (a[0] == idx.search_exact(&query, 1, allow)[0]) as usize;
            }
            assert!(agree >= 45, "{name}: top-1 agreed {agree}/50 times");
        }
        let gone: Vec<u64> = (0..1000).collect();
        idx.remove(&gone); // a third tombstoned: due for compaction, which rebuilds the graph
        assert!(idx.needs_compaction());
        idx.compact();
        assert!(!idx.needs_compaction() && idx.tombstones() == 0);
        assert_eq!(idx.compactions(), 1);
        assert_eq!(idx.len(), 2000);
        assert!(idx.uses_hnsw());
        for q in [0usize, 500, 999] {
            assert!(idx
                .search(&vs[q], 5, &|_| true)
                .iter()
                .all(|h| h.point_id >= 1000));
        }
        assert_eq!(idx.search(&vs[1234], 1, &|_| true)[0].point_id, 1234);
    }

    #[test]
    fn appended_rows_are_found_at_once_and_graph_work_runs_while_searches_go_on() {
        for engine in IndexEngine::ALL {
            appended_rows_are_found_at_once_and_graph_work_runs_while_searches_go_on_on(engine);
        }
    }

    fn appended_rows_are_found_at_once_and_graph_work_runs_while_searches_go_on_on(
        engine: IndexEngine,
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let dim = 32;
        let vs: Vec<Vec<f32>> = (0..4000).map(|_| random_unit(&mut rng, dim)).collect();
        let items = |range: std::ops::Range<usize>| -> Vec<(u64, &[f32])> {
            range.map(|i| (i as u64, vs[i].as_slice())).collect()
        };
        let cfg = IndexConfig {
            hnsw_threshold: 1000,
            ef_construction: 64,
            engine,
            ..Default::default()
        };
        let mut idx = VectorIndex::new(dim, cfg);
        // Past the threshold by appends: no graph yet, the build is graph work.
        idx.append(&items(0..1500)).unwrap();
        assert!(!idx.uses_hnsw());
        assert_eq!(idx.search(&vs[1499], 1, &|_| true)[0].point_id, 1499);
        let work = idx.graph_work().unwrap();
        assert_eq!(work.len(), 1500);
        let built = std::thread::scope(|s| {
            let running = s.spawn(move || work.run());
            // The index is only read meanwhile: routes go on.
            while !running.is_finished() {
                assert_eq!(idx.search(&vs[700], 1, &|_| true)[0].point_id, 700);
            }
            running.join().unwrap().unwrap()
        });
        assert!(idx.install_graph(built));
        assert!(idx.uses_hnsw() && idx.graph_work().is_none());
        // Appended rows past the graph's are found before their work runs and after.
        idx.append(&items(1500..4000)).unwrap();
        idx.remove(&[3999]);
        for i in [1500, 2500, 3998] {
            assert_eq!(idx.search(&vs[i], 1, &|_| true)[0].point_id, i as u64);
        }
        assert_ne!(idx.search(&vs[3999], 1, &|_| true)[0].point_id, 3999);
        let work = idx.graph_work().unwrap();
        assert_eq!(work.len(), 2499);
        std::thread::scope(|s| {
            let running = s.spawn(move || work.run());
            let mut searched = 0;
            while !running.is_finished() || searched == 0 {
                for i in [10, 1600, 3000] {
                    let hits = idx.search(&vs[i], 3, &|_| true);
                    assert_eq!(hits[0].point_id, i as u64);
                    assert!(hits.windows(2).all(|w| w[0].point_id != w[1].point_id));
                }
                searched += 1;
            }
            assert!(running.join().unwrap().is_none());
        });
        assert!(idx.graph_work().is_none());
        // Every stored vector finds itself through the graph, as through the exact scan.
        for i in (0..3999).step_by(7) {
            assert_eq!(idx.search(&vs[i], 1, &|_| true)[0].point_id, i as u64);
        }
        // A graph built for an index that was compacted meanwhile is not installed.
        let mut small = VectorIndex::new(dim, idx.config.clone());
        small.append(&items(0..1200)).unwrap();
        let work = small.graph_work().unwrap();
        small.remove(&(0..400).collect::<Vec<_>>());
        small.compact();
        assert!(!small.install_graph(work.run().unwrap()));
    }

    /// `centres` runs of `per_centre` similar unit vectors, side by side (one expert's
    /// instances, as a registration inserts them): about 0.8 cosine to their centre and 0.65
    /// to each other, as sentence embeddings of one task are (runs of near-duplicates, 0.97
    /// to each other, are harder: see the README).
    fn similar_runs(centres: usize, per_centre: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        similar_runs_with(centres, per_centre, dim, seed, 2.6)
    }

    fn similar_runs_with(
        centres: usize,
        per_centre: usize,
        dim: usize,
        seed: u64,
        spread: f32,
    ) -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(centres * per_centre);
        for _ in 0..centres {
            let c = random_unit(&mut rng, dim);
            for _ in 0..per_centre {
                let mut v: Vec<f32> = c
                    .iter()
                    .map(|x| x + spread * (rng.random::<f32>() - 0.5) / (dim as f32).sqrt())
                    .collect();
                crate::embedding::normalize(&mut v);
                out.push(v);
            }
        }
        out
    }

    #[test]
    fn every_stored_point_is_reachable_and_finds_itself_on_both_engines() {
        for engine in IndexEngine::ALL {
            let dim = 48;
            let vs = similar_runs(40, 100, dim, 3);
            let cfg = IndexConfig {
                hnsw_threshold: 500,
                ef_construction: 64,
                engine,
                ..Default::default()
            };
            let mut idx = VectorIndex::new(dim, cfg);
            // Experts registered one after another, each run inserted in parallel on 16
            // threads (more than the cores: inserters interleave often).
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(16)
                .build()
                .unwrap();
            for expert in 0..40 {
                let items: Vec<(u64, &[f32])> = (expert * 100..(expert + 1) * 100)
                    .map(|i| (i as u64, vs[i].as_slice()))
                    .collect();
                pool.install(|| idx.insert(&items)).unwrap();
            }
            assert!(idx.uses_hnsw());
            assert_eq!(idx.graph_engine(), Some(engine));
            assert_eq!(idx.unreachable_points(), Vec::<u64>::new(), "{engine}");
            // Each stored vector queried with itself: what the exact scan answers.
            let mut missed = Vec::new();
            for (i, v) in vs.iter().enumerate() {
                let got = idx.search(v, 1, &|_| true);
                if got[0].point_id != i as u64 {
                    missed.push(i);
                }
                assert_eq!(idx.search_exact(v, 1, &|_| true)[0].point_id, i as u64);
            }
            assert_eq!(missed, Vec::<usize>::new(), "{engine}");
        }
        let vs = similar_runs(2, 100, 48, 3);
        let within = crate::embedding::dot(&vs[0], &vs[1]);
        let across = crate::embedding::dot(&vs[0], &vs[100]);
        assert!(
            (0.5..0.8).contains(&within) && across.abs() < 0.5,
            "{within} {across}"
        );
    }

    /// What runs of near-duplicates (0.97 cosine) do to each engine: measured, printed
    /// (`--nocapture`), not asserted beyond reachability.
    #[test]
    fn runs_of_near_duplicates_stay_reachable_on_both_engines() {
        for engine in IndexEngine::ALL {
            let dim = 48;
            let vs = similar_runs_with(40, 100, dim, 3, 0.6);
            let cfg = IndexConfig {
                hnsw_threshold: 500,
                ef_construction: 64,
                engine,
                ..Default::default()
            };
            let mut idx = VectorIndex::new(dim, cfg);
            for expert in 0..40 {
                let items: Vec<(u64, &[f32])> = (expert * 100..(expert + 1) * 100)
                    .map(|i| (i as u64, vs[i].as_slice()))
                    .collect();
                idx.insert(&items).unwrap();
            }
            let missed = (0..vs.len())
                .filter(|&i| idx.search(&vs[i], 1, &|_| true)[0].point_id != i as u64)
                .count();
            eprintln!(
                "{engine}: {missed} of {} near-duplicates not found by their own vector",
                vs.len()
            );
            if engine == IndexEngine::Graph {
                assert_eq!(idx.unreachable_points(), Vec::<u64>::new());
            }
        }
    }

    /// Live points and what an exact search sees, for comparing two indexes.
    fn exact_view(idx: &VectorIndex, queries: &[Vec<f32>]) -> (Vec<u64>, Vec<Vec<Hit>>) {
        let mut live: Vec<u64> = idx.live_points().collect();
        live.sort_unstable();
        let hits = queries
            .iter()
            .map(|q| idx.search_exact(q, 20, &|_| true))
            .collect();
        (live, hits)
    }

    #[test]
    fn a_background_compaction_replays_the_writes_made_during_it() {
        for engine in IndexEngine::ALL {
            a_background_compaction_replays_the_writes_made_during_it_on(engine);
        }
    }

    fn a_background_compaction_replays_the_writes_made_during_it_on(engine: IndexEngine) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let dim = 16;
        let vs: Vec<Vec<f32>> = (0..2400).map(|_| random_unit(&mut rng, dim)).collect();
        let cfg = IndexConfig {
            hnsw_threshold: 600,
            ef_construction: 64,
            engine,
            ..Default::default()
        };
        let items = |range: std::ops::Range<usize>| -> Vec<(u64, &[f32])> {
            range.map(|i| (i as u64, vs[i].as_slice())).collect()
        };
        let mut idx = VectorIndex::new(dim, cfg);
        idx.insert(&items(0..1600)).unwrap();
        idx.remove(&(0..500).collect::<Vec<_>>());
        assert!(idx.needs_compaction() && idx.uses_hnsw());
        // A snapshot copied in chunks, with writes between the chunks and after the copy.
        let mut snapshot = idx.begin_compaction();
        assert!(!idx.copy_into(&mut snapshot, 800));
        idx.remove(&[100, 600, 1500]); // already gone, copied, not copied yet
        assert!(idx.copy_into(&mut snapshot, 800));
        assert_eq!(snapshot.len(), 300 + 800 - 1);
        idx.insert(&items(1600..2000)).unwrap();
        // Re-inserted points (a new row each): one copied, one appended since.
        idx.insert(&[(900, vs[2100].as_slice()), (1700, vs[2200].as_slice())])
            .unwrap();
        let compacted = snapshot.build(&|| false).unwrap();
        assert!(compacted.index().uses_hnsw());
        assert_eq!(compacted.index().len(), 1099);
        idx.remove(&[1000, 1800, 1601]);
        idx.insert(&items(2000..2050)).unwrap();
        // What a synchronous compaction of the same index gives.
        let mut sync = VectorIndex::new(dim, idx.config.clone());
        let rows: Vec<(u64, &[f32])> = (0..idx.points.len())
            .filter(|r| !idx.deleted.contains(r))
            .map(|r| (idx.points[r], idx.row(r)))
            .collect();
        sync.insert(&rows).unwrap();
        let queries: Vec<Vec<f32>> = (0..30).map(|_| random_unit(&mut rng, dim)).collect();
        let before = exact_view(&idx, &queries);
        let report = idx.swap_in(compacted).unwrap();
        assert_eq!(
            report,
            SwapReport {
                // 1600..2000 less 1601, 1700's first row and 1800; 900 and 1700 again;
                // 2000..2050.
                inserted: 397 + 2 + 50,
                // Copied, then tombstoned: 600, 900's first row, 1000.
                removed: 3,
            }
        );
        assert_eq!(idx.tombstones(), 3);
        assert_eq!(exact_view(&idx, &queries), before);
        assert_eq!(exact_view(&idx, &queries), exact_view(&sync, &queries));
        assert_eq!(idx.compactions(), 1);
        // 900 lives on with its new vector, in the graph too.
        assert_eq!(idx.search(&vs[2100], 1, &|_| true)[0].point_id, 900);
        assert!(idx.search(&vs[900], 1, &|_| true)[0].score < 0.999);
        // A compaction built from other rows is refused and changes nothing.
        let mut other = VectorIndex::new(dim, idx.config.clone());
        other.insert(&items(0..10)).unwrap();
        let mut s = other.begin_compaction();
        other.copy_into(&mut s, usize::MAX);
        let stale = s.build(&|| false).unwrap();
        assert!(idx.swap_in(stale).is_err());
        assert_eq!(exact_view(&idx, &queries), before);
        // A cancelled build gives nothing.
        let mut s = idx.begin_compaction();
        idx.copy_into(&mut s, usize::MAX);
        assert!(s.build(&|| true).is_none());
    }

    /// 1200 points (ids 1000..), the first 100 tombstoned, in an HNSW index.
    fn graph_index(dim: usize, engine: IndexEngine) -> (VectorIndex, Vec<Vec<f32>>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let vs: Vec<Vec<f32>> = (0..1200).map(|_| random_unit(&mut rng, dim)).collect();
        let cfg = IndexConfig {
            hnsw_threshold: 500,
            ef_construction: 64,
            engine,
            ..Default::default()
        };
        let mut idx = VectorIndex::new(dim, cfg);
        let items: Vec<(u64, &[f32])> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| (1000 + i as u64, v.as_slice()))
            .collect();
        idx.insert(&items).unwrap();
        idx.remove(&(1000..1100).collect::<Vec<_>>());
        assert!(idx.uses_hnsw() && idx.len() == 1100);
        (idx, vs)
    }

    fn stored(vs: &[Vec<f32>]) -> HashMap<u64, &[f32]> {
        vs.iter()
            .enumerate()
            .skip(100)
            .map(|(i, v)| (1000 + i as u64, v.as_slice()))
            .collect()
    }

    #[test]
    fn a_dumped_graph_loads_back_and_searches_identically() {
        for engine in IndexEngine::ALL {
            a_dumped_graph_loads_back_and_searches_identically_on(engine);
        }
    }

    fn a_dumped_graph_loads_back_and_searches_identically_on(engine: IndexEngine) {
        let dim = 24;
        let (idx, vs) = graph_index(dim, engine);
        let tmp = tempfile::tempdir().unwrap();
        let files = idx.dump_graph(tmp.path(), "g").unwrap().unwrap();
        assert_eq!(files.len(), engine.file_suffixes().len() + 1);
        let mut loaded =
            VectorIndex::load_graph(dim, idx.config.clone(), tmp.path(), "g", &stored(&vs))
                .unwrap();
        assert!(loaded.uses_hnsw());
        assert_eq!(loaded.len(), idx.len());
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..50 {
            let q = random_unit(&mut rng, dim);
            let allow = |p: u64| p % 3 < 2;
            assert_eq!(idx.search(&q, 10, &allow), loaded.search(&q, 10, &allow));
        }
        // Tombstones stay tombstoned; the loaded graph takes insertions and deletions.
        assert!(loaded
            .search(&vs[5], 10, &|_| true)
            .iter()
            .all(|h| h.point_id >= 1100));
        let extra = random_unit(&mut rng, dim);
        loaded.insert(&[(7, extra.as_slice())]).unwrap();
        assert_eq!(loaded.search(&extra, 1, &|_| true)[0].point_id, 7);
        loaded.remove(&[7]);
        assert_ne!(loaded.search(&extra, 1, &|_| true)[0].point_id, 7);
    }

    #[test]
    fn loading_refuses_graphs_that_do_not_match_the_store() {
        for engine in IndexEngine::ALL {
            loading_refuses_graphs_that_do_not_match_the_store_on(engine);
        }
    }

    fn loading_refuses_graphs_that_do_not_match_the_store_on(engine: IndexEngine) {
        let dim = 24;
        let (idx, vs) = graph_index(dim, engine);
        let tmp = tempfile::tempdir().unwrap();
        idx.dump_graph(tmp.path(), "g").unwrap().unwrap();
        let cfg = idx.config.clone();
        let load = |stored: &HashMap<u64, &[f32]>| {
            VectorIndex::load_graph(dim, cfg.clone(), tmp.path(), "g", stored)
        };
        // A stored point the graph lacks, a graph point the store lacks.
        let mut more = stored(&vs);
        more.insert(1, vs[0].as_slice());
        assert!(load(&more).is_err());
        let mut fewer = stored(&vs);
        fewer.remove(&1500);
        assert!(load(&fewer).is_err());
        // A stored vector that differs from the graph's copy.
        let changed: Vec<f32> = vs[500].iter().map(|x| x * 0.5).collect();
        let mut other = stored(&vs);
        other.insert(1500, changed.as_slice());
        let err = load(&other).err().unwrap().to_string();
        assert!(err.contains("differs"), "{err}");
        // Other settings than the graph was built with.
        let m8 = IndexConfig {
            max_connections: 8,
            ..cfg.clone()
        };
        assert!(VectorIndex::load_graph(dim, m8, tmp.path(), "g", &stored(&vs)).is_err());
        // A truncated graph file: an error, not a crash.
        let graph = tmp.path().join(format!("g{}", engine.file_suffixes()[0]));
        let len = std::fs::metadata(&graph).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&graph)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(load(&stored(&vs)).is_err());
        // A bad row table.
        std::fs::write(tmp.path().join("g.rows"), b"ROEROWS1 short").unwrap();
        assert!(load(&stored(&vs)).is_err());
        // No graph at all: nothing to dump.
        let small = VectorIndex::new(dim, IndexConfig::default());
        assert!(small.dump_graph(tmp.path(), "s").unwrap().is_none());
    }
}
