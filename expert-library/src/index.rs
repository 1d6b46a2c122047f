//! Maximum-inner-product index over instance embeddings.
//!
//! Vectors are unit length, so inner product = cosine and MIPS = nearest neighbour. Small
//! libraries are scanned exactly (at ~10k vectors a scan beats a graph); past
//! `hnsw_threshold` live vectors an HNSW graph (hnsw_rs) answers instead. Insertion is
//! continual; deletion is a tombstone honoured at once by filtered search, and `compact`
//! drops tombstoned rows and rebuilds the graph once they pile up.

use std::collections::{HashMap, HashSet};

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use crate::error::{LibraryError, Result};

/// `1 - dot`, clamped at 0: rounding can push the dot of unit vectors above 1, which the
/// stock `DistDot` rejects with a panic.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClampedDotDistance;

impl Distance<f32> for ClampedDotDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - crate::embedding::dot(a, b)).max(0.0)
    }
}

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Live vectors from which on the HNSW graph answers searches instead of a full scan.
    pub hnsw_threshold: usize,
    pub max_connections: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    /// Fraction of tombstoned rows that triggers compaction.
    pub compact_ratio: f32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            hnsw_threshold: 20_000,
            max_connections: 16,
            ef_construction: 200,
            ef_search: 128,
            compact_ratio: 0.25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub point_id: u64,
    pub score: f32,
}

pub struct VectorIndex {
    dim: usize,
    config: IndexConfig,
    /// Row-major vectors; row r belongs to `points[r]`.
    data: Vec<f32>,
    points: Vec<u64>,
    row_of: HashMap<u64, usize>,
    deleted: HashSet<usize>,
    hnsw: Option<Hnsw<'static, f32, ClampedDotDistance>>,
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
        }
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

    /// Adds vectors; a point id already present is replaced.
    pub fn insert(&mut self, items: &[(u64, &[f32])]) -> Result<()> {
        for (pid, v) in items {
            if v.len() != self.dim {
                return Err(LibraryError::Index(format!(
                    "vector of point {pid} has {} dimensions, the index {}",
                    v.len(),
                    self.dim
                )));
            }
        }
        let first_new = self.points.len();
        for (pid, v) in items {
            if let Some(old) = self.row_of.get(pid) {
                self.deleted.insert(*old);
            }
            let r = self.points.len();
            self.points.push(*pid);
            self.data.extend_from_slice(v);
            self.row_of.insert(*pid, r);
        }
        match &self.hnsw {
            Some(h) => {
                let batch: Vec<(&[f32], usize)> = (first_new..self.points.len())
                    .map(|r| (self.row(r), r))
                    .collect();
                h.parallel_insert_slice(&batch);
            }
            None if self.len() >= self.config.hnsw_threshold => self.build_hnsw(),
            None => {}
        }
        Ok(())
    }

    /// Tombstones points; searches skip them from now on.
    pub fn remove(&mut self, point_ids: &[u64]) {
        for pid in point_ids {
            if let Some(r) = self.row_of.remove(pid) {
                self.deleted.insert(r);
            }
        }
        if !self.points.is_empty()
            && self.deleted.len() as f32 / self.points.len() as f32 >= self.config.compact_ratio
        {
            self.compact();
        }
    }

    /// Drops tombstoned rows and rebuilds the graph (or drops it when the index got small).
    pub fn compact(&mut self) {
        if self.deleted.is_empty() {
            return;
        }
        let mut data = Vec::with_capacity(self.len() * self.dim);
        let mut points = Vec::with_capacity(self.len());
        for r in 0..self.points.len() {
            if !self.deleted.contains(&r) {
                data.extend_from_slice(self.row(r));
                points.push(self.points[r]);
            }
        }
        self.row_of = points.iter().enumerate().map(|(r, p)| (*p, r)).collect();
        self.data = data;
        self.points = points;
        self.deleted.clear();
        self.hnsw = None;
        if self.len() >= self.config.hnsw_threshold {
            self.build_hnsw();
        }
    }

    fn build_hnsw(&mut self) {
        let n = self.points.len();
        let layers = 16.min(((n.max(2) as f32).ln().ceil() as usize).max(1));
        let h = Hnsw::new(
            self.config.max_connections,
            n.max(1024),
            layers,
            self.config.ef_construction,
            ClampedDotDistance,
        );
        let batch: Vec<(&[f32], usize)> = (0..n)
            .filter(|r| !self.deleted.contains(r))
            .map(|r| (self.row(r), r))
            .collect();
        h.parallel_insert_slice(&batch);
        let mut h = h;
        h.set_searching_mode(true);
        self.hnsw = Some(h);
    }

    /// The `k` live points most similar to `query` among those `allow` accepts, best first,
    /// ties broken by point id. Uses HNSW when built, else an exact scan.
    pub fn search(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<Hit> {
        match &self.hnsw {
            Some(h) => {
                let filter = |row: &usize| !self.deleted.contains(row) && allow(self.points[*row]);
                // Ask for a margin beyond k: duplicates (the same text stored by two experts)
                // tie exactly, and only with all tied candidates in hand does the id tie-break
                // pick the same one as the exact scan.
                let want = k + 16;
                let ef = self.config.ef_search.max(want);
                let mut hits: Vec<Hit> = h
                    .search_filter(query, want, ef, Some(&filter))
                    .into_iter()
                    .map(|n| Hit {
                        point_id: self.points[n.d_id],
                        score: crate::embedding::dot(query, self.row(n.d_id)),
                    })
                    .collect();
                sort_hits(&mut hits);
                hits.truncate(k);
                hits
            }
            None => self.search_exact(query, k, allow),
        }
    }

    /// Exact top-k by a full scan, whatever the index size (the ground truth for HNSW).
    pub fn search_exact(&self, query: &[f32], k: usize, allow: &dyn Fn(u64) -> bool) -> Vec<Hit> {
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

    /// Bytes held by vectors and bookkeeping (the graph is estimated by its edge count).
    pub fn approx_memory_bytes(&self) -> usize {
        let vectors = self.data.len() * 4;
        let book = self.points.len() * (8 + 8 + 16);
        let graph = if self.hnsw.is_some() {
            // Each point keeps up to 2M neighbours on layer 0 (and few above), as
            // (id, distance, pointer) tuples, and its own copy of the vector.
            self.points.len() * (self.config.max_connections * 2 * 24 + self.dim * 4)
        } else {
            0
        };
        vectors + book + graph
    }
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
        let mut v: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>() - 0.5).collect();
        crate::embedding::normalize(&mut v);
        v
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
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let dim = 32;
        let vs: Vec<Vec<f32>> = (0..3000).map(|_| random_unit(&mut rng, dim)).collect();
        let cfg = IndexConfig {
            hnsw_threshold: 1000,
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
        let gone: Vec<u64> = (0..1000).collect();
        idx.remove(&gone); // a third tombstoned: compaction rebuilds the graph
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
}
