//! The HNSW graph behind a large [`crate::index::VectorIndex`] (Malkov & Yashunin's
//! hierarchical navigable small world), over the index's rows, by inner product on bf16
//! copies of the vectors.
//!
//! Why its own graph: at 1M x 384 on these CPUs a search spends most of its time waiting
//! for vectors to arrive from memory. The layout is hnswlib's, which measured fastest: each
//! node's vector and its level-0 neighbour list lie together in one cache-line-aligned block,
//! and while a node's neighbours are gathered their vectors are prefetched, so the loads
//! overlap instead of queueing one after the other. (usearch, used before, keeps vectors
//! apart from the lists and prefetches nothing: 1.2-1.4x hnswlib's search time here.)
//! Vectors are bf16, half hnswlib's bytes to move, with AVX-512 BF16 dot products where the
//! CPU has them ([`kernels`]); bf16 rounding caps the graph's own recall near 0.997, so the
//! index asks for a margin of candidates and scores them again against its f32 rows.
//!
//! Concurrency: insertion runs on all cores (`add_rows` takes `&mut self`, so no search runs
//! meanwhile); inserters read neighbour lists as atomics without locks and change a node's
//! list under that node's lock. Every vector is written before the parallel insertion
//! starts and never again, so it is read as plain memory.

mod file;
pub(crate) mod kernels;

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::index::IndexConfig;
use kernels::Kernel;

/// No node (an empty graph's entry point, a row with no node).
const NONE: u32 = u32::MAX;

/// Levels above the base one a node may have (a node reaches level l with chance M^-l:
/// at M=16, 15 levels would take 16^15 nodes).
const MAX_LEVEL: usize = 15;

/// Words of one cache line.
const LINE_WORDS: usize = 16;

/// Lines of a vector prefetched ahead of its dot product: all of it (384 bf16 = 12 lines).
const PREFETCH_VECTOR_LINES: usize = 12;

#[repr(C, align(64))]
struct Line([AtomicU32; LINE_WORDS]);

impl Line {
    fn zeroed() -> Self {
        Self(std::array::from_fn(|_| AtomicU32::new(0)))
    }
}

/// A candidate: its distance (the negated inner product: smaller is nearer) and node.
#[derive(Debug, Clone, Copy)]
struct Near {
    d: f32,
    node: u32,
}

impl PartialEq for Near {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Near {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.d.total_cmp(&other.d).then(self.node.cmp(&other.node))
    }
}

/// Nodes seen by one search: a tag per node, equal to the search's epoch once seen, so a new
/// search costs one increment instead of clearing the array.
#[derive(Default)]
struct Visited {
    tags: Vec<u16>,
    epoch: u16,
}

impl Visited {
    fn start(&mut self, nodes: usize) {
        if self.tags.len() < nodes {
            self.tags.resize(nodes, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.tags.fill(0);
            self.epoch = 1;
        }
    }

    /// True the first time `node` is seen in this search.
    #[inline]
    fn first_visit(&mut self, node: u32) -> bool {
        let tag = &mut self.tags[node as usize];
        let first = *tag != self.epoch;
        *tag = self.epoch;
        first
    }
}

/// The entry point of searches: a node on the top level.
#[derive(Debug, Clone, Copy)]
struct Top {
    node: u32,
    level: usize,
}

pub(crate) struct Graph {
    dim: usize,
    /// Words (bf16 pairs) of a padded vector; a block's neighbour count follows them.
    vec_words: usize,
    /// Words of one node's block: vector, count, `m0` links, padding to whole lines.
    stride: usize,
    /// Neighbours kept per node above level 0, and at level 0.
    m: usize,
    m0: usize,
    ef_construction: usize,
    ef_search: AtomicUsize,
    level_mult: f64,
    kernel: Kernel,
    blocks: Vec<Line>,
    levels: Vec<u8>,
    /// Per node, its lists above level 0: for level l, a count then `m` links at
    /// `(l - 1) * (1 + m)`. Empty for nodes on level 0 only.
    upper: Vec<Box<[AtomicU32]>>,
    locks: Vec<Mutex<()>>,
    top: Mutex<Top>,
    /// Row of each node, and node of each row.
    rows: Vec<u32>,
    node_of: Vec<u32>,
    visited: Mutex<Vec<Visited>>,
}

impl Graph {
    /// An empty graph with room for `capacity` vectors.
    pub(crate) fn new(dim: usize, config: &IndexConfig, capacity: usize) -> Result<Self, String> {
        let m = config.max_connections;
        if dim == 0 || !(2..=1024).contains(&m) || config.ef_construction == 0 {
            return Err(format!(
                "no graph of {dim} dimensions with M={m}, ef_construction={}",
                config.ef_construction
            ));
        }
        let mut g = Self::empty(dim, m, config);
        g.blocks.reserve(capacity * g.stride / LINE_WORDS);
        Ok(g)
    }

    fn empty(dim: usize, m: usize, config: &IndexConfig) -> Self {
        let vec_words = kernels::vector_words(dim);
        let m0 = 2 * m;
        Self {
            dim,
            vec_words,
            stride: (vec_words + 1 + m0).div_ceil(LINE_WORDS) * LINE_WORDS,
            m,
            m0,
            ef_construction: config.ef_construction.max(1),
            ef_search: AtomicUsize::new(config.ef_search),
            level_mult: 1.0 / (m as f64).ln(),
            kernel: Kernel::detect(),
            blocks: Vec::new(),
            levels: Vec::new(),
            upper: Vec::new(),
            locks: Vec::new(),
            top: Mutex::new(Top {
                node: NONE,
                level: 0,
            }),
            rows: Vec::new(),
            node_of: Vec::new(),
            visited: Mutex::new(Vec::new()),
        }
    }

    /// Vectors in the graph (tombstoned rows included: the index filters them).
    pub(crate) fn size(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn connectivity(&self) -> usize {
        self.m
    }

    pub(crate) fn dimensions(&self) -> usize {
        self.dim
    }

    /// The distance kernel chosen for this CPU.
    pub(crate) fn kernels(&self) -> String {
        self.kernel.name().to_string()
    }

    /// Candidates a search keeps (at least the count asked for).
    pub(crate) fn set_ef_search(&self, ef: usize) {
        self.ef_search.store(ef.max(1), Ordering::Relaxed);
    }

    /// Bytes the graph holds: blocks, upper lists, locks, the row maps.
    pub(crate) fn memory_bytes(&self) -> usize {
        let upper: usize = self.upper.iter().map(|u| 16 + 4 * u.len()).sum();
        let visited: usize = self.visited.lock().iter().map(|v| 2 * v.tags.len()).sum();
        self.blocks.capacity() * std::mem::size_of::<Line>()
            + upper
            + self.levels.len()
            + self.locks.len() * std::mem::size_of::<Mutex<()>>()
            + 4 * (self.rows.len() + self.node_of.len())
            + visited
    }

    /// The first word of `node`'s block.
    ///
    /// Every node id the graph stores or passes around is below `self.rows.len()`, and
    /// `blocks` holds that many blocks: links are only ever written with such ids, and
    /// [`Self::load`] checks every one it reads.
    #[inline(always)]
    fn block(&self, node: u32) -> *const AtomicU32 {
        debug_assert!((node as usize) < self.rows.len());
        // SAFETY: in bounds, as above.
        unsafe {
            self.blocks
                .as_ptr()
                .cast::<AtomicU32>()
                .add(node as usize * self.stride)
        }
    }

    /// `node`'s packed vector (written before the node is reachable, never after).
    #[inline(always)]
    fn vector_ptr(&self, node: u32) -> *const u32 {
        self.block(node).cast::<u32>()
    }

    /// `node`'s list at `level`: the count, then the room for links.
    #[inline(always)]
    fn list(&self, node: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            // SAFETY: a block holds the vector, the count and `m0` links.
            unsafe { std::slice::from_raw_parts(self.block(node).add(self.vec_words), 1 + self.m0) }
        } else {
            let w = 1 + self.m;
            &self.upper[node as usize][(level - 1) * w..level * w]
        }
    }

    /// The links `list` holds now (a snapshot: an inserter may be changing it).
    #[inline(always)]
    fn links<'a>(&self, list: &'a [AtomicU32]) -> impl Iterator<Item = u32> + 'a {
        let n = (list[0].load(Ordering::Acquire) as usize).min(list.len() - 1);
        list[1..=n].iter().map(|w| w.load(Ordering::Relaxed))
    }

    fn cap(&self, level: usize) -> usize {
        if level == 0 {
            self.m0
        } else {
            self.m
        }
    }

    #[inline(always)]
    fn dist(&self, q: *const u32, node: u32) -> f32 {
        // SAFETY: `q` is a packed vector of `vec_words` words (the query's or a node's), the
        // node's vector is one too, and the kernel is the one detected on this CPU.
        -unsafe { self.kernel.dot(q, self.vector_ptr(node), self.vec_words) }
    }

    fn with_visited<R>(&self, f: impl FnOnce(&mut Visited) -> R) -> R {
        let mut v = self.visited.lock().pop().unwrap_or_default();
        v.start(self.rows.len());
        let r = f(&mut v);
        self.visited.lock().push(v);
        r
    }

    /// Greedy descent on one upper level: the nearest node reachable by always improving.
    fn greedy(&self, q: *const u32, mut at: Near, level: usize) -> Near {
        loop {
            let mut moved = false;
            for x in self.links(self.list(at.node, level)) {
                let d = self.dist(q, x);
                if d < at.d {
                    at = Near { d, node: x };
                    moved = true;
                }
            }
            if !moved {
                return at;
            }
        }
    }

    /// The best-first search of one level from `entry`, keeping the `ef` nearest nodes that
    /// `keep` accepts (nodes it refuses are still walked through). Worst of them on top.
    fn search_level(
        &self,
        q: *const u32,
        entry: Near,
        ef: usize,
        level: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
        visited: &mut Visited,
    ) -> BinaryHeap<Near> {
        let kept = |node: u32| keep.is_none_or(|k| k(node));
        let mut results = BinaryHeap::with_capacity(ef + 1);
        let mut frontier = BinaryHeap::with_capacity(4 * ef);
        visited.first_visit(entry.node);
        frontier.push(Reverse(entry));
        let mut bound = f32::INFINITY;
        if kept(entry.node) {
            results.push(entry);
            bound = entry.d;
        }
        let mut fresh: Vec<u32> = Vec::with_capacity(self.m0);
        while let Some(Reverse(c)) = frontier.pop() {
            if c.d > bound && results.len() >= ef {
                break;
            }
            fresh.clear();
            for x in self.links(self.list(c.node, level)) {
                if visited.first_visit(x) {
                    kernels::prefetch(self.vector_ptr(x), PREFETCH_VECTOR_LINES);
                    fresh.push(x);
                }
            }
            for &x in &fresh {
                let d = self.dist(q, x);
                if results.len() < ef || d < bound {
                    // Its list is read next if it stays near the front.
                    kernels::prefetch(self.block(x).wrapping_add(self.vec_words).cast(), 2);
                    frontier.push(Reverse(Near { d, node: x }));
                    if kept(x) {
                        results.push(Near { d, node: x });
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                    if let Some(worst) = results.peek() {
                        bound = worst.d;
                    }
                }
            }
        }
        results
    }

    /// The nearest nodes to packed `q` on level 0, nearest first, `count` at most.
    fn search_nodes(
        &self,
        q: &[u32],
        count: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Near> {
        let top = *self.top.lock();
        if top.node == NONE || count == 0 {
            return Vec::new();
        }
        let q = q.as_ptr();
        let mut at = Near {
            d: self.dist(q, top.node),
            node: top.node,
        };
        for level in (1..=top.level).rev() {
            at = self.greedy(q, at, level);
        }
        let ef = self.ef_search.load(Ordering::Relaxed).max(count);
        let found = self.with_visited(|v| self.search_level(q, at, ef, 0, keep, v));
        let mut found = found.into_sorted_vec();
        found.truncate(count);
        found
    }

    fn pack_query(&self, query: &[f32]) -> Result<Vec<u32>, String> {
        if query.len() != self.dim {
            return Err(format!(
                "a {}-d query for a {}-d graph",
                query.len(),
                self.dim
            ));
        }
        let mut q = vec![0u32; self.vec_words];
        kernels::pack(query, &mut q);
        Ok(q)
    }

    /// Up to `count` rows `keep` accepts, nearest first by the graph's (bf16) scores.
    pub(crate) fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<usize>, String> {
        let q = self.pack_query(query)?;
        let keep_node = |node: u32| keep(self.rows[node as usize] as usize);
        let found = self.search_nodes(&q, count, Some(&keep_node));
        Ok(found
            .iter()
            .map(|n| self.rows[n.node as usize] as usize)
            .collect())
    }

    /// [`Self::search`] with no predicate: every row the graph holds may be returned.
    pub(crate) fn search_unfiltered(
        &self,
        query: &[f32],
        count: usize,
    ) -> Result<Vec<usize>, String> {
        let q = self.pack_query(query)?;
        let found = self.search_nodes(&q, count, None);
        Ok(found
            .iter()
            .map(|n| self.rows[n.node as usize] as usize)
            .collect())
    }

    /// The graph's copy of row `r`, widened to f32, if it holds one.
    pub(crate) fn vector(&self, r: usize, out: &mut [f32]) -> bool {
        let Some(&node) = self.node_of.get(r) else {
            return false;
        };
        if node == NONE || out.len() != self.dim {
            return false;
        }
        // SAFETY: the node exists; its vector is `vec_words` words.
        let words = unsafe { std::slice::from_raw_parts(self.vector_ptr(node), self.vec_words) };
        for (i, x) in out.iter_mut().enumerate() {
            *x = kernels::unpack(words, i);
        }
        true
    }

    /// A node's level: -ln(U) / ln(M), U uniform in (0, 1], from a hash of its row (the
    /// same row gets the same level in every build).
    fn level_of(&self, row: u32) -> u8 {
        let mut z = (row as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL) as u8
    }

    /// Adds `rows` (row numbers, with their vectors from `vector_of`), inserting in parallel.
    /// Nothing changes when any row is refused (a row already in the graph, a vector of
    /// the wrong length).
    pub(crate) fn add_rows<'a>(
        &mut self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String> {
        let Some(&highest) = rows.iter().max() else {
            return Ok(());
        };
        if highest >= NONE as usize || self.rows.len() + rows.len() >= NONE as usize {
            return Err(format!("row {highest} is past what the graph can number"));
        }
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        for &r in rows {
            if self.node_of.get(r).is_some_and(|n| *n != NONE) || !seen.insert(r) {
                return Err(format!("row {r} is in the graph already"));
            }
            if vector_of(r).len() != self.dim {
                return Err(format!(
                    "row {r} has {} dimensions, the graph {}",
                    vector_of(r).len(),
                    self.dim
                ));
            }
        }
        let first = self.rows.len();
        let lines = self.stride / LINE_WORDS;
        self.blocks
            .resize_with((first + rows.len()) * lines, Line::zeroed);
        let vec_words = self.vec_words;
        self.blocks[first * lines..]
            .par_chunks_mut(lines)
            .zip(rows.par_iter())
            .for_each(|(block, &r)| {
                // SAFETY: a block of lines is that many words (AtomicU32 is a u32), and
                // `&mut` makes this the only access.
                let words = unsafe {
                    std::slice::from_raw_parts_mut(block.as_mut_ptr().cast::<u32>(), lines * 16)
                };
                kernels::pack(vector_of(r), &mut words[..vec_words]);
            });
        if self.node_of.len() <= highest {
            self.node_of.resize(highest + 1, NONE);
        }
        for (i, &r) in rows.iter().enumerate() {
            let level = self.level_of(r as u32);
            self.levels.push(level);
            self.upper.push(
                (0..level as usize * (1 + self.m))
                    .map(|_| AtomicU32::new(0))
                    .collect(),
            );
            self.locks.push(Mutex::new(()));
            self.rows.push(r as u32);
            self.node_of[r] = (first + i) as u32;
        }
        let graph = &*self;
        (first..graph.rows.len())
            .into_par_iter()
            .with_min_len(16)
            .for_each(|node| graph.insert(node as u32));
        Ok(())
    }

    /// Links `node` (its vector written, its lists empty) into the graph.
    fn insert(&self, node: u32) {
        let level = self.levels[node as usize] as usize;
        let mut top_guard = self.top.lock();
        let top = *top_guard;
        if top.node == NONE {
            *top_guard = Top { node, level };
            return;
        }
        // A node above the top level becomes the entry point: others wait for it to be
        // linked rather than start from a node not yet reachable.
        let raises = level > top.level;
        let top_guard = if raises {
            Some(top_guard)
        } else {
            drop(top_guard);
            None
        };
        let q = self.vector_ptr(node);
        let mut at = Near {
            d: self.dist(q, top.node),
            node: top.node,
        };
        for l in (level + 1..=top.level).rev() {
            at = self.greedy(q, at, l);
        }
        for l in (0..=level.min(top.level)).rev() {
            let found =
                self.with_visited(|v| self.search_level(q, at, self.ef_construction, l, None, v));
            let mut found = found.into_sorted_vec();
            found.retain(|c| c.node != node);
            let Some(&nearest) = found.first() else {
                continue;
            };
            at = nearest;
            let chosen = self.select(&found, self.m);
            self.write_list(node, l, &chosen);
            for &n in &chosen {
                self.link_back(n, node, l);
            }
        }
        if let Some(mut guard) = top_guard {
            *guard = Top { node, level };
        }
    }

    /// Malkov & Yashunin's neighbour heuristic (hnswlib's): from candidates sorted nearest
    /// first, keep one unless a node already kept is nearer to it than the base is; at most
    /// `m`. Spreads the links over directions instead of spending them all on one cluster.
    fn select(&self, sorted: &[Near], m: usize) -> Vec<u32> {
        if sorted.len() <= m {
            return sorted.iter().map(|c| c.node).collect();
        }
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for c in sorted {
            if kept.len() >= m {
                break;
            }
            let v = self.vector_ptr(c.node);
            if kept.iter().all(|&k| self.dist(v, k) >= c.d) {
                kept.push(c.node);
            }
        }
        kept
    }

    fn write_list(&self, node: u32, level: usize, links: &[u32]) {
        let _lock = self.locks[node as usize].lock();
        self.store_list(self.list(node, level), links);
    }

    /// Stores `links` into `list`, the count last, so a reader never sees a count beyond
    /// the links written. The caller holds the node's lock.
    fn store_list(&self, list: &[AtomicU32], links: &[u32]) {
        for (w, &x) in list[1..].iter().zip(links) {
            w.store(x, Ordering::Relaxed);
        }
        list[0].store(links.len() as u32, Ordering::Release);
    }

    /// Adds `new` to `node`'s list at `level`, pruning the list by the heuristic when full.
    fn link_back(&self, node: u32, new: u32, level: usize) {
        let _lock = self.locks[node as usize].lock();
        let list = self.list(node, level);
        let current: Vec<u32> = self.links(list).collect();
        if current.contains(&new) {
            return;
        }
        let cap = self.cap(level);
        if current.len() < cap {
            list[1 + current.len()].store(new, Ordering::Relaxed);
            list[0].store(current.len() as u32 + 1, Ordering::Release);
            return;
        }
        let v = self.vector_ptr(node);
        let mut candidates: Vec<Near> = current
            .iter()
            .chain(std::iter::once(&new))
            .map(|&x| Near {
                d: self.dist(v, x),
                node: x,
            })
            .collect();
        candidates.sort_unstable();
        let kept = self.select(&candidates, cap);
        self.store_list(list, &kept);
    }

    /// Writes the graph (with its vectors) to `path`, unsynced.
    pub(crate) fn save(&self, path: &Path) -> Result<(), String> {
        file::save(self, path).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Reads a graph [`Self::save`] wrote, checking that every link and level in it is one
    /// the graph can hold. The caller checks the vectors against its own rows.
    pub(crate) fn load(path: &Path, dim: usize, config: &IndexConfig) -> Result<Self, String> {
        file::load(path, dim, config)
    }
}

#[cfg(test)]
mod tests;
