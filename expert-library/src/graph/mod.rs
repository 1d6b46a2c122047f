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
//! Concurrency: insertion runs on all cores while searches go on (`add_rows` takes `&self`;
//! one `add_rows` at a time). Nodes live in chunks that are allocated once and never move,
//! so a search never waits for the graph to grow. Inserters and searches read neighbour
//! lists as atomics without locks; a node's list changes under that node's lock. Every
//! node's vector, level and row are written before any link names it and never again, so
//! they are read as plain memory.
//!
//! Every node stays reachable: a node's own list write keeps the links others made to it
//! meanwhile; after each insertion every new node is searched for with its own vector and,
//! when the search misses it, linked from the nearest node it returns; and the nodes the
//! neighbour heuristic left without a way in are linked from their nearest reachable node
//! ([`Graph::unreachable`] is empty).

mod file;
pub(crate) mod kernels;

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use crate::engine::VectorCheck;
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

/// ef of the search that checks each new node finds itself.
const FINDABLE_EF: usize = 32;

/// Nodes of one chunk: 2^14 (16 MB of blocks at 384 dimensions).
const CHUNK_BITS: u32 = 14;
const CHUNK_NODES: usize = 1 << CHUNK_BITS;

/// Chunks a graph may have: 2^26 nodes (64 GB of blocks at 384 dimensions, past any
/// machine this runs on).
const MAX_CHUNKS: usize = 1 << 12;

/// The nodes `[c * CHUNK_NODES, (c + 1) * CHUNK_NODES)`: their blocks, levels, rows, upper
/// lists and locks. Allocated whole before its first node is written, freed with the graph.
struct Chunk {
    blocks: Box<[Line]>,
    levels: Box<[AtomicU8]>,
    rows: Box<[AtomicU32]>,
    upper: Box<[OnceLock<Box<[AtomicU32]>>]>,
    locks: Box<[Mutex<()>]>,
}

impl Chunk {
    fn new(lines_per_node: usize) -> Box<Self> {
        // Zeroed by the allocator: pages of nodes not yet added cost no memory.
        let len = CHUNK_NODES * lines_per_node;
        let blocks: Box<[Line]> = match std::alloc::Layout::array::<Line>(len) {
            Ok(layout) if layout.size() > 0 => {
                // SAFETY: the layout is non-zero-sized; a Line is atomics, for which all-zero
                // bytes are a valid value; the pointer is the global allocator's, for `len`
                // Lines, so a Box of that slice frees it with the same layout.
                unsafe {
                    let p = std::alloc::alloc_zeroed(layout).cast::<Line>();
                    if p.is_null() {
                        std::alloc::handle_alloc_error(layout);
                    }
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len))
                }
            }
            _ => Box::new([]),
        };
        Box::new(Self {
            blocks,
            levels: (0..CHUNK_NODES).map(|_| AtomicU8::new(0)).collect(),
            rows: (0..CHUNK_NODES).map(|_| AtomicU32::new(NONE)).collect(),
            upper: (0..CHUNK_NODES).map(|_| OnceLock::new()).collect(),
            locks: (0..CHUNK_NODES).map(|_| Mutex::new(())).collect(),
        })
    }

    fn bytes(&self) -> usize {
        let upper: usize = self
            .upper
            .iter()
            .filter_map(|u| u.get())
            .map(|u| 4 * u.len())
            .sum();
        self.blocks.len() * std::mem::size_of::<Line>()
            + CHUNK_NODES
                * (1 + 4
                    + std::mem::size_of::<OnceLock<Box<[AtomicU32]>>>()
                    + std::mem::size_of::<Mutex<()>>())
            + upper
    }
}

#[repr(C, align(64))]
struct Line([AtomicU32; LINE_WORDS]);

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

    /// True the first time `node` is seen in this search. A node added since the search
    /// started grows the tags.
    #[inline]
    fn first_visit(&mut self, node: u32) -> bool {
        let i = node as usize;
        if i >= self.tags.len() {
            self.tags.resize((i + 1).next_power_of_two(), 0);
        }
        let tag = &mut self.tags[i];
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
    /// The nodes, [`CHUNK_NODES`] a chunk; chunk `c` is set before node `c * CHUNK_NODES`
    /// is counted in `len`. A node's upper lists: for level l, a count then `m` links at
    /// `(l - 1) * (1 + m)` (none for nodes on level 0 only).
    chunks: Box<[OnceLock<Box<Chunk>>]>,
    /// Nodes added: ids below it name written nodes.
    len: AtomicUsize,
    top: Mutex<Top>,
    /// The node of each row (`NONE`: none).
    node_of: RwLock<Vec<u32>>,
    /// Every row below it the caller gave the graph is in it (see [`Self::complete_below`]).
    complete_below: AtomicUsize,
    /// One [`Self::add_rows`] at a time.
    adding: Mutex<()>,
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
        if capacity > MAX_CHUNKS * CHUNK_NODES {
            return Err(format!("no graph of {capacity} vectors"));
        }
        Ok(Self::empty(dim, m, config))
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
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            top: Mutex::new(Top {
                node: NONE,
                level: 0,
            }),
            node_of: RwLock::new(Vec::new()),
            complete_below: AtomicUsize::new(0),
            adding: Mutex::new(()),
            visited: Mutex::new(Vec::new()),
        }
    }

    /// Vectors in the graph (tombstoned rows included: the index filters them).
    pub(crate) fn size(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Every row below this that the caller handed to [`Self::add_rows`] (in ascending
    /// order) is fully linked; rows at or past it may still be being inserted.
    pub(crate) fn complete_below(&self) -> usize {
        self.complete_below.load(Ordering::Acquire)
    }

    /// The chunk of `node`, which must be below `len` (so its chunk is set).
    #[inline(always)]
    fn chunk(&self, node: u32) -> &Chunk {
        let c = (node >> CHUNK_BITS) as usize;
        debug_assert!(self.chunks.get(c).is_some_and(|c| c.get().is_some()));
        // SAFETY: every node id the graph stores or passes around is below `len`, whose
        // chunks are set (and never unset): links are only ever written with such ids, and
        // [`Self::load`] checks every one it reads.
        unsafe { self.chunks.get_unchecked(c).get().unwrap_unchecked() }
    }

    #[inline(always)]
    fn slot(node: u32) -> usize {
        node as usize & (CHUNK_NODES - 1)
    }

    fn level(&self, node: u32) -> usize {
        self.chunk(node).levels[Self::slot(node)].load(Ordering::Relaxed) as usize
    }

    #[inline(always)]
    fn row_of_node(&self, node: u32) -> u32 {
        self.chunk(node).rows[Self::slot(node)].load(Ordering::Relaxed)
    }

    fn lock(&self, node: u32) -> parking_lot::MutexGuard<'_, ()> {
        self.chunk(node).locks[Self::slot(node)].lock()
    }

    /// Lines of one node's block.
    fn lines(&self) -> usize {
        self.stride / LINE_WORDS
    }

    /// Makes sure nodes below `n` have their chunks.
    fn grow_to(&self, n: usize) -> Result<(), String> {
        if n > MAX_CHUNKS * CHUNK_NODES {
            return Err(format!("{n} nodes are past what the graph can hold"));
        }
        for c in 0..n.div_ceil(CHUNK_NODES) {
            self.chunks[c].get_or_init(|| Chunk::new(self.lines()));
        }
        Ok(())
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
    /// Bytes the graph holds: chunks (blocks, upper lists, locks, rows), the row map.
    pub(crate) fn memory_bytes(&self) -> usize {
        let visited: usize = self.visited.lock().iter().map(|v| 2 * v.tags.len()).sum();
        let chunks: usize = self
            .chunks
            .iter()
            .filter_map(|c| c.get())
            .map(|c| c.bytes())
            .sum();
        chunks
            + self.chunks.len() * std::mem::size_of::<OnceLock<Box<Chunk>>>()
            + 4 * self.node_of.read().len()
            + visited
    }

    /// The first word of `node`'s block (see [`Self::chunk`] for why it exists).
    #[inline(always)]
    fn block(&self, node: u32) -> *const AtomicU32 {
        let chunk = self.chunk(node);
        // SAFETY: a chunk holds CHUNK_NODES blocks of `stride` words.
        unsafe {
            chunk
                .blocks
                .as_ptr()
                .cast::<AtomicU32>()
                .add(Self::slot(node) * self.stride)
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
            let lists = self.chunk(node).upper[Self::slot(node)]
                .get()
                .map_or(&[][..], |u| &u[..]);
            &lists[(level - 1) * w..level * w]
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
        v.start(self.size());
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
        if count == 0 {
            return Vec::new();
        }
        let ef = self.ef_search.load(Ordering::Relaxed).max(count);
        let mut found = self.search_from_top(q.as_ptr(), ef, keep);
        found.truncate(count);
        found
    }

    /// A search's descent from the entry point through the upper levels, then its level-0
    /// search keeping the `ef` nearest nodes `keep` accepts: nearest first, empty for an
    /// empty graph.
    fn search_from_top(
        &self,
        q: *const u32,
        ef: usize,
        keep: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<Near> {
        let top = *self.top.lock();
        if top.node == NONE {
            return Vec::new();
        }
        let mut at = Near {
            d: self.dist(q, top.node),
            node: top.node,
        };
        for level in (1..=top.level).rev() {
            at = self.greedy(q, at, level);
        }
        self.with_visited(|v| self.search_level(q, at, ef, 0, keep, v))
            .into_sorted_vec()
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
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<usize>, String> {
        let q = self.pack_query(query)?;
        let keep_node = |node: u32| keep(self.row_of_node(node) as usize);
        let found = self.search_nodes(&q, count, Some(&keep_node));
        Ok(found
            .iter()
            .map(|n| self.row_of_node(n.node) as usize)
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
            .map(|n| self.row_of_node(n.node) as usize)
            .collect())
    }

    /// The graph's copy of row `r`, widened to f32, if it holds one.
    #[cfg(test)]
    pub(crate) fn vector(&self, r: usize, out: &mut [f32]) -> bool {
        let Some(&node) = self.node_of.read().get(r) else {
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

    /// Adds `rows` (row numbers, with their vectors from `vector_of`), inserting in parallel
    /// while searches go on; then links any node left unreachable. Nothing changes when any
    /// row is refused (a row already in the graph, a vector of the wrong length). Rows are
    /// expected in ascending order, above those added before (see [`Self::complete_below`]).
    pub(crate) fn add_rows<'a>(
        &self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String> {
        let _adding = self.adding.lock();
        let Some(&highest) = rows.iter().max() else {
            return Ok(());
        };
        let first = self.size();
        if highest >= NONE as usize || first + rows.len() >= NONE as usize {
            return Err(format!("row {highest} is past what the graph can number"));
        }
        {
            let node_of = self.node_of.read();
            let mut seen = std::collections::HashSet::with_capacity(rows.len());
            for &r in rows {
                if node_of.get(r).is_some_and(|n| *n != NONE) || !seen.insert(r) {
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
        }
        self.grow_to(first + rows.len())?;
        // Each new node's vector, level, row and upper lists, before any link names it.
        let vec_words = self.vec_words;
        rows.par_iter().enumerate().for_each(|(i, &r)| {
            let node = (first + i) as u32;
            let mut packed = vec![0u32; vec_words];
            kernels::pack(vector_of(r), &mut packed);
            let block = self.block(node);
            for (j, w) in packed.iter().enumerate() {
                // SAFETY: the block holds `vec_words` vector words; no link names the node
                // yet, so nothing else reads them.
                unsafe { (*block.add(j)).store(*w, Ordering::Relaxed) };
            }
            let chunk = self.chunk(node);
            let slot = Self::slot(node);
            let level = self.level_of(r as u32);
            chunk.levels[slot].store(level, Ordering::Relaxed);
            chunk.rows[slot].store(r as u32, Ordering::Relaxed);
            if level > 0 {
                let lists = (0..level as usize * (1 + self.m))
                    .map(|_| AtomicU32::new(0))
                    .collect();
                let _ = chunk.upper[slot].set(lists);
            }
        });
        {
            let mut node_of = self.node_of.write();
            if node_of.len() <= highest {
                node_of.resize(highest + 1, NONE);
            }
            for (i, &r) in rows.iter().enumerate() {
                node_of[r] = (first + i) as u32;
            }
        }
        self.len.store(first + rows.len(), Ordering::Release);
        (first..first + rows.len())
            .into_par_iter()
            .with_min_len(16)
            .for_each(|node| self.insert(node as u32));
        let mut check: Vec<u32> = (first as u32..(first + rows.len()) as u32).collect();
        self.make_findable(&mut check);
        self.repair();
        self.complete_below
            .fetch_max(highest + 1, Ordering::Release);
        Ok(())
    }

    /// Links `node` (its vector written, its lists empty) into the graph.
    fn insert(&self, node: u32) {
        let level = self.level(node);
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

    /// Gives `node` (being inserted) its links on `level`, keeping those other inserters
    /// made to it meanwhile: it is reachable from the moment it links back on its top level,
    /// while its lower lists are still empty, so a node inserted beside it may have found
    /// only it and linked to it alone. Overwriting that list dropped such a node's only
    /// in-link and left it unreachable.
    fn write_list(&self, node: u32, level: usize, links: &[u32]) {
        let _lock = self.lock(node);
        let list = self.list(node, level);
        let mut all: Vec<u32> = links.to_vec();
        for x in self.links(list) {
            if !all.contains(&x) {
                all.push(x);
            }
        }
        self.store_pruned(node, level, all);
    }

    /// Stores `links` as `node`'s list on `level`, pruned by the heuristic to the list's
    /// capacity when there are more. The caller holds the node's lock.
    fn store_pruned(&self, node: u32, level: usize, links: Vec<u32>) {
        let list = self.list(node, level);
        let cap = self.cap(level);
        if links.len() <= cap {
            self.store_list(list, &links);
            return;
        }
        let v = self.vector_ptr(node);
        let mut candidates: Vec<Near> = links
            .iter()
            .map(|&x| Near {
                d: self.dist(v, x),
                node: x,
            })
            .collect();
        candidates.sort_unstable();
        let kept = self.select(&candidates, cap);
        self.store_list(list, &kept);
    }

    /// Makes `nodes` findable: each is searched for with its own vector (as the index
    /// searches, unfiltered), and one the search does not return is linked from the
    /// nearest node it does return, through which the next such search reaches it. A
    /// reachable node can still be missed: a run of similar rows can form a group whose
    /// only links in come from far away. Returns the nodes relinked.
    fn make_findable(&self, nodes: &mut Vec<u32>) -> usize {
        nodes.sort_unstable();
        nodes.dedup();
        // A narrow search: a node it finds, a wider one finds too; one it misses is relinked
        // (harmless when a wider search would have found it).
        let ef = FINDABLE_EF
            .min(self.ef_search.load(Ordering::Relaxed))
            .max(1);
        let started = std::time::Instant::now();
        let lost: Vec<(u32, u32)> = nodes
            .par_iter()
            .filter_map(|&z| {
                let q = self.vector_ptr(z);
                let own = self.dist(q, z);
                let found = self.search_from_top(q, ef, None);
                let host = *found.iter().find(|c| c.node == z).or(found.first())?;
                // Found, or an exact twin of it found first.
                (host.node != z && host.d > own).then_some((host.node, z))
            })
            .collect();
        if lost.is_empty() {
            return 0;
        }
        let searched = started.elapsed();
        let in_degree = self.in_degrees();
        for &(host, z) in &lost {
            self.relink(host, z, &in_degree);
        }
        tracing::debug!(
            checked = nodes.len(),
            relinked = lost.len(),
            search_ms = searched.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "graph nodes made findable"
        );
        lost.len()
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
        let _lock = self.lock(node);
        let list = self.list(node, level);
        let current: Vec<u32> = self.links(list).collect();
        if current.contains(&new) {
            return;
        }
        if current.len() < self.cap(level) {
            list[1 + current.len()].store(new, Ordering::Relaxed);
            list[0].store(current.len() as u32 + 1, Ordering::Release);
            return;
        }
        let mut all = current;
        all.push(new);
        self.store_pruned(node, level, all);
    }

    /// Links every node no search can reach (the neighbour heuristic can prune a node's
    /// last in-link) from its nearest reachable node, so that every node stays findable.
    /// Runs after insertion, with no inserter left; searches may run meanwhile. Returns the
    /// nodes relinked.
    fn repair(&self) -> usize {
        let mut reached = self.reached();
        let mut relinked = 0;
        // A relink can only take a slot of a full list, so a round may orphan the node whose
        // slot it took (one with another in-link is chosen when there is one); a new round
        // relinks those. Rounds are few: most lists have room.
        for _ in 0..8 {
            let orphans: Vec<u32> = (0..self.size() as u32)
                .filter(|x| !reached[*x as usize])
                .collect();
            if orphans.is_empty() {
                break;
            }
            let in_degree = self.in_degrees();
            for z in orphans {
                if reached[z as usize] {
                    continue; // reached through an orphan relinked before it
                }
                let host = self.nearest_host(z, &reached);
                self.relink(host, z, &in_degree);
                reached[z as usize] = true;
                self.walk_from(&[z], &mut reached);
                relinked += 1;
            }
            reached = self.reached();
        }
        if relinked > 0 {
            tracing::debug!(
                relinked,
                nodes = self.size(),
                "unreachable graph nodes relinked"
            );
        }
        relinked
    }

    /// How many level-0 lists name each node.
    fn in_degrees(&self) -> Vec<u32> {
        let mut d = vec![0u32; self.size()];
        for x in 0..self.size() as u32 {
            for y in self.links(self.list(x, 0)) {
                d[y as usize] += 1;
            }
        }
        d
    }

    /// The node nearest to `z` among those `reached`, preferring one with room in its
    /// level-0 list (the entry point when the search finds none).
    fn nearest_host(&self, z: u32, reached: &[bool]) -> u32 {
        let keep = |x: u32| x != z && reached[x as usize];
        let found = self.search_from_top(self.vector_ptr(z), self.ef_construction, Some(&keep));
        let has_room = |x: u32| self.links(self.list(x, 0)).count() < self.m0;
        found
            .iter()
            .find(|c| has_room(c.node))
            .or(found.first())
            .map_or(self.top.lock().node, |c| c.node)
    }

    /// Adds `z` to `host`'s level-0 list; when the list is full, `z` takes the slot of the
    /// farthest link that other lists also name (else of the farthest).
    fn relink(&self, host: u32, z: u32, in_degree: &[u32]) {
        let _lock = self.lock(host);
        let list = self.list(host, 0);
        let mut current: Vec<u32> = self.links(list).collect();
        if current.contains(&z) {
            return;
        }
        if current.len() < self.m0 {
            current.push(z);
            self.store_list(list, &current);
            return;
        }
        let v = self.vector_ptr(host);
        let farthest = |pool: &mut dyn Iterator<Item = usize>| {
            pool.max_by(|a, b| {
                self.dist(v, current[*a])
                    .total_cmp(&self.dist(v, current[*b]))
            })
        };
        let shared =
            farthest(&mut (0..current.len()).filter(|i| in_degree[current[*i] as usize] > 1));
        let slot = shared
            .or_else(|| farthest(&mut (0..current.len())))
            .unwrap_or(0);
        current[slot] = z;
        self.store_list(list, &current);
    }

    /// Writes the graph (with its vectors) to `path`, unsynced.
    pub(crate) fn save(&self, path: &Path) -> Result<(), String> {
        file::save(self, path).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Reads a graph [`Self::save`] wrote, checking that every link and level in it is one
    /// the graph can hold. The caller checks the vectors against its own rows.
    /// `row_limit`: rows are below it (the index's row count), checked before anything is
    /// sized from them.
    pub(crate) fn load(
        path: &Path,
        dim: usize,
        config: &IndexConfig,
        row_limit: usize,
    ) -> Result<Self, String> {
        file::load(path, dim, config, row_limit)
    }

    /// Which nodes a walk of level 0 from the entry point reaches (the nodes a search can
    /// return at all).
    fn reached(&self) -> Vec<bool> {
        let n = self.size();
        let mut reached = vec![false; n];
        let top = self.top.lock().node;
        if top != NONE {
            reached[top as usize] = true;
            self.walk_from(&[top], &mut reached);
        }
        reached
    }

    /// Marks every node reachable on level 0 from `from` (marked already) in `reached`.
    fn walk_from(&self, from: &[u32], reached: &mut [bool]) {
        let mut stack = from.to_vec();
        while let Some(x) = stack.pop() {
            for y in self.links(self.list(x, 0)) {
                if !std::mem::replace(&mut reached[y as usize], true) {
                    stack.push(y);
                }
            }
        }
    }

    /// Nodes no search can reach: none, once [`Self::add_rows`] has returned.
    pub(crate) fn unreachable(&self) -> Vec<u32> {
        let reached = self.reached();
        (0..self.size() as u32)
            .filter(|x| !reached[*x as usize])
            .collect()
    }

    /// The rows of [`Self::unreachable`]'s nodes.
    pub(crate) fn unreachable_rows(&self) -> Vec<usize> {
        self.unreachable()
            .into_iter()
            .map(|x| self.row_of_node(x) as usize)
            .collect()
    }

    /// Calls `check` with every node's row and its vector widened to f32, on all cores.
    pub(crate) fn check_vectors(&self, check: &VectorCheck<'_>) -> Result<(), String> {
        let nodes: Vec<u32> = (0..self.size() as u32).collect();
        nodes.par_chunks(4096).try_for_each(|chunk| {
            let mut v = vec![0.0f32; self.dim];
            for &node in chunk {
                // SAFETY: the node exists; its vector is `vec_words` words.
                let words =
                    unsafe { std::slice::from_raw_parts(self.vector_ptr(node), self.vec_words) };
                for (i, x) in v.iter_mut().enumerate() {
                    *x = kernels::unpack(words, i);
                }
                check(self.row_of_node(node) as usize, &v)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
