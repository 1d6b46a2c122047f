//! The `hnsw_rs` engine: the hnsw_rs crate's graph behind [`AnnGraph`], used as its authors
//! intend it — its own parallel insertion (`parallel_insert_slice`), its filtered search
//! (`search_filter` with a [`FilterT`] closure), its dump (`file_dump`) and reload
//! (`HnswIo`).
//!
//! What roe adds around it:
//! - an inner-product distance that clamps rounding ([`DotDistance`]): hnsw_rs's `DistDot`
//!   asserts `1 - dot >= 0` and panics when a unit vector's dot with itself rounds above 1;
//! - the first point inserted alone (concurrent first inserts can leave one without links);
//! - `max_layer` 16, the only value hnsw_rs can dump;
//! - findability: after each insertion every new point is searched for with its own vector,
//!   and the few a search misses (hnsw_rs leaves some, and offers no way to add a link) are
//!   kept aside with their vectors and scanned exactly by every search ([`Strays`]);
//! - a reload that cannot panic the process (hnsw_rs asserts on malformed files: the
//!   manifest's checksums keep those from reaching it, and a panic is turned into an error
//!   all the same) and that yields an owned graph: hnsw_rs's reloaded graph borrows its
//!   `HnswIo`, which is leaked (a few hundred bytes per reload; vectors are copied, not
//!   mapped, so nothing else is borrowed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hnsw_rs::prelude::{AnnT, Distance, FilterT, Hnsw, HnswIo};

use crate::engine::{AnnGraph, IndexEngine, VectorCheck};
use crate::index::IndexConfig;

/// hnsw_rs's layer count: it dumps only graphs made with its maximum.
const MAX_LAYER: usize = 16;

/// `1 - <a, b>` on unit vectors, clamped to [0, 2] (NaN counts as farthest): hnsw_rs's graph
/// asserts that every distance is finite and non-negative. The dot product is roe's, chosen
/// for the CPU at run time.
#[derive(Debug, Default, Clone, Copy)]
pub struct DotDistance;

impl Distance<f32> for DotDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        let d = 1.0 - crate::embedding::dot(a, b);
        if d.is_nan() {
            2.0
        } else {
            d.clamp(0.0, 2.0)
        }
    }
}

/// Keeps the rows a search's predicate accepts.
struct Keep<'a>(&'a (dyn Fn(usize) -> bool + Sync));

impl FilterT for Keep<'_> {
    fn hnsw_filter(&self, id: &usize) -> bool {
        (self.0)(*id)
    }
}

/// Points hnsw_rs holds but its search does not return for their own vector: each row with
/// its vector, scanned exactly by every search.
#[derive(Default)]
struct Strays {
    rows: Vec<usize>,
    vectors: Vec<f32>,
}

pub(crate) struct HnswRsGraph {
    hnsw: Hnsw<'static, f32, DotDistance>,
    strays: parking_lot::RwLock<Strays>,
    dim: usize,
    m: usize,
    ef_search: AtomicUsize,
    complete_below: AtomicUsize,
    /// One add_rows at a time (rows must rise across calls).
    adding: parking_lot::Mutex<()>,
}

impl HnswRsGraph {
    pub(crate) fn new(dim: usize, config: &IndexConfig, capacity: usize) -> Result<Self, String> {
        let m = config.max_connections;
        // hnsw_rs exits the process past 256 and stores M in a u8.
        if dim == 0 || !(2..=255).contains(&m) || config.ef_construction == 0 {
            return Err(format!(
                "no hnsw_rs graph of {dim} dimensions with M={m}, ef_construction={}",
                config.ef_construction
            ));
        }
        let hnsw = Hnsw::new(
            m,
            capacity.max(1),
            MAX_LAYER,
            config.ef_construction,
            DotDistance,
        );
        Ok(Self::wrap(hnsw, dim, config, 0))
    }

    fn wrap(
        hnsw: Hnsw<'static, f32, DotDistance>,
        dim: usize,
        config: &IndexConfig,
        complete_below: usize,
    ) -> Self {
        Self {
            hnsw,
            strays: parking_lot::RwLock::new(Strays::default()),
            dim,
            m: config.max_connections,
            ef_search: AtomicUsize::new(config.ef_search.max(1)),
            complete_below: AtomicUsize::new(complete_below),
            adding: parking_lot::Mutex::new(()),
        }
    }

    /// Reloads a dump [`AnnGraph::save`] wrote, checking what roe relies on: the settings,
    /// the dimension, and every row below `row_limit` and distinct.
    pub(crate) fn load(
        dir: &Path,
        basename: &str,
        dim: usize,
        config: &IndexConfig,
        row_limit: usize,
    ) -> Result<Self, String> {
        for suffix in IndexEngine::HnswRs.file_suffixes() {
            let path = dir.join(format!("{basename}{suffix}"));
            if !path.is_file() {
                return Err(format!("{} is missing", path.display()));
            }
        }
        let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(dir, basename)));
        let loaded =
            std::panic::catch_unwind(|| io.load_hnsw_with_dist::<f32, DotDistance>(DotDistance));
        let hnsw = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(format!("hnsw_rs could not reload {basename}: {e}")),
            Err(_) => return Err(format!("hnsw_rs panicked reloading {basename}")),
        };
        if hnsw.get_max_nb_connection() as usize != config.max_connections
            || hnsw.get_ef_construction() != config.ef_construction
        {
            return Err(format!(
                "built with M={}, ef_construction={}; configured M={}, ef_construction={}",
                hnsw.get_max_nb_connection(),
                hnsw.get_ef_construction(),
                config.max_connections,
                config.ef_construction
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(hnsw.get_nb_point());
        let mut highest = 0;
        for point in hnsw.get_point_indexation() {
            let row = point.get_origin_id();
            if row >= row_limit || !seen.insert(row) {
                return Err(format!(
                    "row {row} twice, or out of range: the index has {row_limit} rows"
                ));
            }
            if point.get_v().len() != dim {
                return Err(format!(
                    "a {}-d point, expected {dim}-d",
                    point.get_v().len()
                ));
            }
            highest = highest.max(row + 1);
        }
        if seen.len() != hnsw.get_nb_point() {
            return Err(format!(
                "{} points listed, the header says {}",
                seen.len(),
                hnsw.get_nb_point()
            ));
        }
        let strays_path = dir.join(format!("{basename}.strays"));
        let strays = read_strays(&strays_path, dim, row_limit)?;
        let graph = Self::wrap(hnsw, dim, config, highest);
        *graph.strays.write() = strays;
        Ok(graph)
    }

    fn check_query(&self, query: &[f32]) -> Result<(), String> {
        if query.len() != self.dim {
            return Err(format!(
                "a {}-d query for a {}-d graph",
                query.len(),
                self.dim
            ));
        }
        Ok(())
    }

    /// The graph's answer merged with the strays `keep` accepts, nearest first, `count` at
    /// most.
    fn with_strays(
        &self,
        query: &[f32],
        found: Vec<hnsw_rs::prelude::Neighbour>,
        count: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<usize> {
        let mut all: Vec<(f32, usize)> = found
            .into_iter()
            .map(|n| (n.get_distance(), n.get_origin_id()))
            .collect();
        let strays = self.strays.read();
        for (i, &row) in strays.rows.iter().enumerate() {
            if keep(row) && !all.iter().any(|(_, r)| *r == row) {
                let v = &strays.vectors[i * self.dim..(i + 1) * self.dim];
                all.push((DotDistance.eval(query, v), row));
            }
        }
        drop(strays);
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(count);
        all.into_iter().map(|(_, row)| row).collect()
    }

    /// Rows among `rows` whose own vector does not find them (an exact twin found instead
    /// counts as found).
    fn unfindable<'a>(
        &self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Vec<usize> {
        use rayon::prelude::*;
        let ef = self.ef_search.load(Ordering::Relaxed).max(2);
        rows.par_iter()
            .copied()
            .filter(|&r| {
                let v = vector_of(r);
                let found = self.hnsw.search(v, 1, ef);
                found.first().is_none_or(|n| {
                    n.get_origin_id() != r && n.get_distance() > DotDistance.eval(v, v)
                })
            })
            .collect()
    }
}

impl AnnGraph for HnswRsGraph {
    fn engine(&self) -> IndexEngine {
        IndexEngine::HnswRs
    }

    fn size(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    fn complete_below(&self) -> usize {
        self.complete_below.load(Ordering::Acquire)
    }

    fn connectivity(&self) -> usize {
        self.m
    }

    fn dimensions(&self) -> usize {
        self.dim
    }

    fn kernels(&self) -> String {
        format!("hnsw_rs, f32 {}", crate::embedding::dot_kernel())
    }

    fn set_ef_search(&self, ef: usize) {
        self.ef_search.store(ef.max(1), Ordering::Relaxed);
    }

    fn memory_bytes(&self) -> usize {
        // hnsw_rs does not say: per point its f32 vector, its Arc'd point and lock, and per
        // link an Arc'd neighbour entry (about 2M links at level 0).
        let strays = self.strays.read();
        self.size() * (4 * self.dim + 160 + 2 * self.m * 48)
            + 4 * strays.vectors.len()
            + 8 * strays.rows.len()
    }

    fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<usize>, String> {
        self.check_query(query)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        // hnsw_rs can panic on a filtered search with ef 1.
        let ef = self.ef_search.load(Ordering::Relaxed).max(count).max(2);
        let filter = Keep(keep);
        let found = self
            .hnsw
            .search_filter(query, count, ef, Some(&filter as &dyn FilterT));
        Ok(self.with_strays(query, found, count, keep))
    }

    fn search_unfiltered(&self, query: &[f32], count: usize) -> Result<Vec<usize>, String> {
        self.check_query(query)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let ef = self.ef_search.load(Ordering::Relaxed).max(count);
        let found = self.hnsw.search(query, count, ef);
        Ok(self.with_strays(query, found, count, &|_| true))
    }

    fn add_rows<'a>(
        &self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String> {
        let _adding = self.adding.lock();
        let Some(&highest) = rows.iter().max() else {
            return Ok(());
        };
        let floor = self.complete_below();
        if rows.windows(2).any(|w| w[0] >= w[1]) || rows[0] < floor {
            return Err(format!(
                "rows must rise and start at {floor} or above (hnsw_rs keeps no row set)"
            ));
        }
        if let Some(r) = rows.iter().find(|r| vector_of(**r).len() != self.dim) {
            return Err(format!(
                "row {r} has {} dimensions, the graph {}",
                vector_of(*r).len(),
                self.dim
            ));
        }
        let mut items: Vec<(&[f32], usize)> = rows.iter().map(|&r| (vector_of(r), r)).collect();
        // The first point alone: concurrent first inserts can leave one without links.
        if self.size() == 0 {
            let first = items.remove(0);
            self.hnsw.insert_slice(first);
        }
        if !items.is_empty() {
            self.hnsw.parallel_insert_slice(&items);
        }
        let lost = self.unfindable(rows, vector_of);
        if !lost.is_empty() {
            tracing::debug!(
                lost = lost.len(),
                rows = rows.len(),
                "hnsw_rs points its search misses, kept aside"
            );
            let mut strays = self.strays.write();
            for r in lost {
                strays.rows.push(r);
                strays.vectors.extend_from_slice(vector_of(r));
            }
        }
        self.complete_below
            .fetch_max(highest + 1, Ordering::Release);
        Ok(())
    }

    fn check_vectors(&self, check: &VectorCheck<'_>) -> Result<(), String> {
        for point in self.hnsw.get_point_indexation() {
            check(point.get_origin_id(), point.get_v())?;
        }
        Ok(())
    }

    fn save(&self, dir: &Path, basename: &str) -> Result<Vec<PathBuf>, String> {
        let written = self
            .hnsw
            .file_dump(dir, basename)
            .map_err(|e| format!("hnsw_rs could not dump {basename}: {e}"))?;
        if written != basename {
            return Err(format!(
                "hnsw_rs dumped under {written} instead of {basename}"
            ));
        }
        let strays_path = dir.join(format!("{basename}.strays"));
        write_strays(&self.strays.read(), self.dim, &strays_path)
            .map_err(|e| format!("writing {}: {e}", strays_path.display()))?;
        Ok(IndexEngine::HnswRs
            .file_suffixes()
            .iter()
            .map(|s| dir.join(format!("{basename}{s}")))
            .collect())
    }

    fn unreachable_rows(&self) -> Vec<usize> {
        // From the top layer's points (the entry point is one of them), along every layer's
        // links: the points a search can reach.
        let top = self.hnsw.get_max_level_observed() as usize;
        let indexation = self.hnsw.get_point_indexation();
        let mut all = Vec::new();
        let mut links: std::collections::HashMap<usize, Vec<usize>> =
            std::collections::HashMap::new();
        let mut stack = Vec::new();
        let mut reached = std::collections::HashSet::new();
        for point in indexation {
            let row = point.get_origin_id();
            all.push(row);
            let out: Vec<usize> = point
                .get_neighborhood_id()
                .iter()
                .flatten()
                .map(|n| n.get_origin_id())
                .collect();
            links.insert(row, out);
            if point.get_point_id().0 as usize == top && reached.insert(row) {
                stack.push(row);
            }
        }
        while let Some(x) = stack.pop() {
            for &y in links.get(&x).map_or(&[][..], |v| &v[..]) {
                if reached.insert(y) {
                    stack.push(y);
                }
            }
        }
        // Strays are found by the exact scan beside the graph.
        let strays = self.strays.read();
        all.retain(|r| !reached.contains(r) && !strays.rows.contains(r));
        all.sort_unstable();
        all
    }
}

const STRAYS_MAGIC: &[u8; 8] = b"ROESTRAY";

/// `"ROESTRAY"`, count u64, dim u64, the rows (u64 each), their vectors (f32 each), all
/// little-endian.
fn write_strays(strays: &Strays, dim: usize, path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(STRAYS_MAGIC)?;
    out.write_all(&(strays.rows.len() as u64).to_le_bytes())?;
    out.write_all(&(dim as u64).to_le_bytes())?;
    for r in &strays.rows {
        out.write_all(&(*r as u64).to_le_bytes())?;
    }
    for x in &strays.vectors {
        out.write_all(&x.to_le_bytes())?;
    }
    out.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

fn read_strays(path: &Path, dim: usize, row_limit: usize) -> Result<Strays, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let bad = |m: &str| format!("{}: {m}", path.display());
    let head = bytes.get(..24).ok_or_else(|| bad("too short"))?;
    if &head[..8] != STRAYS_MAGIC {
        return Err(bad("not a strays file"));
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (n, file_dim) = (word(8), word(16));
    if file_dim != dim as u64 {
        return Err(bad("another dimension"));
    }
    let body = &bytes[24..];
    let expected = n.checked_mul(8 + 4 * dim as u64);
    if expected != Some(body.len() as u64) {
        return Err(bad("length does not match its count"));
    }
    let n = n as usize;
    let (rows_bytes, vector_bytes) = body.split_at(8 * n);
    let mut rows = Vec::with_capacity(n);
    for chunk in rows_bytes.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let r = u64::from_le_bytes(b);
        if r >= row_limit as u64 {
            return Err(bad("a row past the index's rows"));
        }
        rows.push(r as usize);
    }
    let vectors = vector_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Strays { rows, vectors })
}
