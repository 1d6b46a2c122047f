//! The HNSW engines behind [`crate::index::VectorIndex`], one trait over both:
//! - `graph` (the default): roe's own graph ([`crate::graph`]), bf16 vectors beside their
//!   links, every node kept reachable; it won the measured comparison
//!   (`bench/results/hnsw.md`);
//! - `hnsw_rs`: the design card's crate ([`crate::hnsw_rs_engine`]), as its authors intend
//!   it: its parallel insertion, its filtered search, its dump and reload.
//!
//! The engine is chosen at run time (`roe serve --index-engine`) and recorded in the
//! persisted manifest, so a dump of the other engine is rebuilt, not misread.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::index::IndexConfig;

/// Which HNSW implementation an index's graph is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexEngine {
    /// roe's own graph.
    #[default]
    Graph,
    /// The hnsw_rs crate.
    HnswRs,
}

impl IndexEngine {
    pub const ALL: [IndexEngine; 2] = [IndexEngine::Graph, IndexEngine::HnswRs];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Graph => "graph",
            Self::HnswRs => "hnsw_rs",
        }
    }

    /// The endings of the files a dump of this engine writes for `<basename>`, in the order
    /// [`AnnGraph::save`] returns them.
    pub(crate) fn file_suffixes(self) -> &'static [&'static str] {
        match self {
            Self::Graph => &[".hnsw"],
            Self::HnswRs => &[".hnsw.graph", ".hnsw.data", ".strays"],
        }
    }
}

impl std::fmt::Display for IndexEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IndexEngine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "graph" => Ok(Self::Graph),
            "hnsw_rs" => Ok(Self::HnswRs),
            other => Err(format!(
                "unknown index engine {other:?}: expected graph or hnsw_rs"
            )),
        }
    }
}

/// Checks one point's row and vector ([`AnnGraph::check_vectors`]).
pub(crate) type VectorCheck<'a> = dyn Fn(usize, &[f32]) -> Result<(), String> + Sync + 'a;

/// An HNSW graph over an index's rows (row numbers are the index's), by inner product on
/// unit vectors. Insertion and search both take `&self` and may run at the same time; one
/// [`Self::add_rows`] at a time.
pub(crate) trait AnnGraph: Send + Sync {
    fn engine(&self) -> IndexEngine;

    /// Points in the graph (tombstoned rows included: the index filters them).
    fn size(&self) -> usize;

    /// Every row below this that was handed to [`Self::add_rows`] (in ascending order) is
    /// fully inserted; rows at or past it may still be being inserted.
    fn complete_below(&self) -> usize;

    /// M, as built.
    fn connectivity(&self) -> usize;

    fn dimensions(&self) -> usize;

    /// How its distances are computed on this CPU.
    fn kernels(&self) -> String;

    /// Candidates a search keeps (at least the count asked for).
    fn set_ef_search(&self, ef: usize);

    /// Bytes it holds (an estimate where the engine does not say).
    fn memory_bytes(&self) -> usize;

    /// Up to `count` rows `keep` accepts, nearest first by the graph's scores.
    fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<usize>, String>;

    /// [`Self::search`] with every row kept.
    fn search_unfiltered(&self, query: &[f32], count: usize) -> Result<Vec<usize>, String>;

    /// Adds `rows` (ascending, above those added before) with their vectors from
    /// `vector_of`; nothing changes when a row is refused.
    fn add_rows<'a>(
        &self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String>;

    /// Calls `check` with every point's row and the graph's copy of its vector (widened to
    /// f32), stopping at the first error. Used to check a loaded graph against the store.
    fn check_vectors(&self, check: &VectorCheck<'_>) -> Result<(), String>;

    /// Writes the graph into `dir` under `basename` (files ending in
    /// [`IndexEngine::file_suffixes`], unsynced) and returns them. No insertion may run
    /// meanwhile (the index's writers are serialised).
    fn save(&self, dir: &Path, basename: &str) -> Result<Vec<PathBuf>, String>;

    /// Rows no search can reach from the entry point (empty for a sound graph).
    fn unreachable_rows(&self) -> Vec<usize>;
}

/// An empty graph of `engine` for `dim`-dimensional rows.
pub(crate) fn new_graph(
    engine: IndexEngine,
    dim: usize,
    config: &IndexConfig,
    capacity: usize,
) -> Result<Box<dyn AnnGraph>, String> {
    Ok(match engine {
        IndexEngine::Graph => Box::new(crate::graph::Graph::new(dim, config, capacity)?),
        IndexEngine::HnswRs => Box::new(crate::hnsw_rs_engine::HnswRsGraph::new(
            dim, config, capacity,
        )?),
    })
}

/// Loads a graph [`AnnGraph::save`] wrote; rows must be below `row_limit`.
pub(crate) fn load_graph(
    engine: IndexEngine,
    dir: &Path,
    basename: &str,
    dim: usize,
    config: &IndexConfig,
    row_limit: usize,
) -> Result<Box<dyn AnnGraph>, String> {
    Ok(match engine {
        IndexEngine::Graph => Box::new(crate::graph::Graph::load(
            &dir.join(format!("{basename}.hnsw")),
            dim,
            config,
            row_limit,
        )?),
        IndexEngine::HnswRs => Box::new(crate::hnsw_rs_engine::HnswRsGraph::load(
            dir, basename, dim, config, row_limit,
        )?),
    })
}

impl AnnGraph for crate::graph::Graph {
    fn engine(&self) -> IndexEngine {
        IndexEngine::Graph
    }

    fn size(&self) -> usize {
        crate::graph::Graph::size(self)
    }

    fn complete_below(&self) -> usize {
        crate::graph::Graph::complete_below(self)
    }

    fn connectivity(&self) -> usize {
        crate::graph::Graph::connectivity(self)
    }

    fn dimensions(&self) -> usize {
        crate::graph::Graph::dimensions(self)
    }

    fn kernels(&self) -> String {
        crate::graph::Graph::kernels(self)
    }

    fn set_ef_search(&self, ef: usize) {
        crate::graph::Graph::set_ef_search(self, ef)
    }

    fn memory_bytes(&self) -> usize {
        crate::graph::Graph::memory_bytes(self)
    }

    fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Vec<usize>, String> {
        crate::graph::Graph::search(self, query, count, keep)
    }

    fn search_unfiltered(&self, query: &[f32], count: usize) -> Result<Vec<usize>, String> {
        crate::graph::Graph::search_unfiltered(self, query, count)
    }

    fn add_rows<'a>(
        &self,
        rows: &[usize],
        vector_of: &(dyn Fn(usize) -> &'a [f32] + Sync),
    ) -> Result<(), String> {
        crate::graph::Graph::add_rows(self, rows, vector_of)
    }

    fn check_vectors(&self, check: &VectorCheck<'_>) -> Result<(), String> {
        crate::graph::Graph::check_vectors(self, check)
    }

    fn save(&self, dir: &Path, basename: &str) -> Result<Vec<PathBuf>, String> {
        let path = dir.join(format!("{basename}.hnsw"));
        crate::graph::Graph::save(self, &path)?;
        Ok(vec![path])
    }

    fn unreachable_rows(&self) -> Vec<usize> {
        crate::graph::Graph::unreachable_rows(self)
    }
}
