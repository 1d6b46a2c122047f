//! The instance index on disk, so that a large library opens without rebuilding its graphs.
//!
//! Layout, inside the library directory (next to sled's files), in `roe-index/`:
//! - `<format>.<dump id>.hnsw`: the HNSW graph with its bf16 copy of the vectors
//!   ([`crate::graph`]'s format);
//! - `<format>.<dump id>.rows`: which point each graph row holds and whether it is tombstoned;
//! - `manifest.json`: format version, dimension, the graph-shaping index settings, and per
//!   text format the number and a SHA-256 of the live point ids it covers, plus the size and
//!   SHA-256 of every file above.
//!
//! A dump is written under fresh file names and becomes current only when the manifest naming
//! it is renamed into place (written to a temporary name and synced first), so a crash at any
//! point leaves either the previous dump or the new one; files no manifest names are removed
//! by the next dump.
//!
//! Sled stays the source of truth. Opening trusts a dump only when the manifest's settings
//! match, its point ids are exactly the stored ones (point ids are never reused, so any insert
//! or delete since the dump changes them), every file has the recorded size and checksum
//! (the graph's loader checks its structure, not its content, so nothing
//! unverified reaches it), and the loaded graph's vectors are the stored vectors rounded to
//! bf16. Anything
//! else is a [`RebuildReason`] and the index is rebuilt from the store.
//!
//! Dumps are written at a graceful [`crate::library::ExpertLibrary::persist_index`] and by
//! the background worker after a compaction ([`crate::compaction`]), which dumps the new
//! indexes while they are still private to it, before swapping them in, so that no lock on
//! the routing state is held for the minutes a dump of a million vectors takes. [`Dumps`]
//! serialises the two and skips the worker's dump when writes happened since its snapshot:
//! such a dump could only be stale. A dump that goes stale because writes follow it is
//! harmless: opening sees the point ids differ and rebuilds.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::IndexEngine;
use crate::error::{LibraryError, Result};
use crate::expert::TextFormat;
use crate::index::{IndexConfig, VectorIndex};

/// Folder of the dump inside the library directory.
pub const INDEX_DIR: &str = "roe-index";
const MANIFEST: &str = "manifest.json";
/// Bumped whenever the files or their meaning change: older dumps are then rebuilt.
/// (1: hnsw_rs dumps; 2: usearch; 3: roe's own graph.)
pub const FORMAT_VERSION: u32 = 3;

/// How opening got its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexLoad {
    /// The persisted graphs matched the store and were loaded; nothing was rebuilt.
    Reloaded,
    /// The index was built from the stored vectors, for this reason.
    Rebuilt(RebuildReason),
}

impl IndexLoad {
    pub fn is_reloaded(&self) -> bool {
        matches!(self, Self::Reloaded)
    }
}

/// Why a persisted index was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildReason {
    /// Nothing persisted: a new library, one too small for a graph, or a crash before the
    /// first dump.
    Missing,
    /// Written by another format version, for another dimension or other index settings.
    Incompatible(String),
    /// The store changed after the dump (experts added, replaced or deleted).
    Stale(String),
    /// Unreadable, truncated or altered files.
    Corrupt(String),
}

impl std::fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "no persisted index"),
            Self::Incompatible(m) => write!(f, "persisted index incompatible: {m}"),
            Self::Stale(m) => write!(f, "persisted index stale: {m}"),
            Self::Corrupt(m) => write!(f, "persisted index unusable: {m}"),
        }
    }
}

/// What [`persist`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistReport {
    /// Graphs written (0: no index uses a graph, so nothing is kept on disk).
    pub graphs: usize,
    /// Bytes of the dump on disk, manifest included.
    pub bytes: u64,
    pub seconds: f64,
}

/// The index settings that shape a graph; the search-time ones (`ef_search`,
/// `compact_ratio`) apply to a loaded graph as they are configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GraphSettings {
    hnsw_threshold: usize,
    max_connections: usize,
    ef_construction: usize,
    /// A dump of another engine is rebuilt, not misread. (Dumps before the field was
    /// written were roe's own graph.)
    #[serde(default)]
    engine: IndexEngine,
}

impl From<&IndexConfig> for GraphSettings {
    fn from(c: &IndexConfig) -> Self {
        Self {
            hnsw_threshold: c.hnsw_threshold,
            max_connections: c.max_connections,
            ef_construction: c.ef_construction,
            engine: c.engine,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    dim: usize,
    settings: GraphSettings,
    indexes: Vec<IndexEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    format: TextFormat,
    /// Live points the index covers and the SHA-256 of their sorted ids.
    live_points: usize,
    points_sha256: String,
    /// The graph's files; `None` for an exact-scan index (rebuilt from the store: cheap).
    graph: Option<GraphEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GraphEntry {
    basename: String,
    files: Vec<FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

pub fn index_dir(library_dir: &Path) -> PathBuf {
    library_dir.join(INDEX_DIR)
}

/// SHA-256 of the sorted point ids, with their count: the fingerprint of a point set.
pub fn points_fingerprint(points: impl Iterator<Item = u64>) -> (usize, String) {
    let mut ids: Vec<u64> = points.collect();
    ids.sort_unstable();
    let mut h = Sha256::new();
    for id in &ids {
        h.update(id.to_le_bytes());
    }
    (ids.len(), hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&h.finalize())))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the graphs of `indexes` into `<library_dir>/roe-index/` and makes them current (see
/// the module docs). When no index has a graph, removes any earlier dump instead: it could
/// only be stale.
pub fn persist(
    library_dir: &Path,
    dim: usize,
    config: &IndexConfig,
    indexes: &[(TextFormat, &VectorIndex)],
) -> Result<PersistReport> {
    let started = std::time::Instant::now();
    if !indexes.iter().any(|(_, index)| index.uses_hnsw()) {
        remove_dump(library_dir)?;
        return Ok(PersistReport {
            graphs: 0,
            bytes: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let dir = index_dir(library_dir);
    std::fs::create_dir_all(&dir).map_err(|e| LibraryError::io(&dir, e))?;
    // A fresh name per dump: the current dump's files are never overwritten.
    let dump_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let mut entries = Vec::new();
    let mut graphs = 0;
    for (format, index) in indexes {
        let (live_points, points_sha256) = points_fingerprint(index.live_points());
        let basename = format!("{}.{dump_id}", format.as_str());
        let graph = match index.dump_graph(&dir, &basename)? {
            None => None,
            Some(paths) => {
                graphs += 1;
                let files = paths
                    .iter()
                    .map(|p| {
                        // The graph's writer does not sync what it saves.
                        std::fs::File::open(p)
                            .and_then(|f| f.sync_all())
                            .and_then(|_| file_sha256(p))
                            .map_err(|e| LibraryError::io(p, e))
                            .map(|(bytes, sha256)| FileEntry {
                                name: file_name(p),
                                bytes,
                                sha256,
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(GraphEntry { basename, files })
            }
        };
        entries.push(IndexEntry {
            format: *format,
            live_points,
            points_sha256,
            graph,
        });
    }
    let manifest_path = dir.join(MANIFEST);
    if graphs == 0 {
        remove_dump(library_dir)?;
        return Ok(PersistReport {
            graphs,
            bytes: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        dim,
        settings: config.into(),
        indexes: entries,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| LibraryError::Index(format!("encoding the index manifest: {e}")))?;
    let tmp = dir.join(format!("{MANIFEST}.{dump_id}.tmp"));
    let write_tmp = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    write_tmp().map_err(|e| LibraryError::io(&tmp, e))?;
    std::fs::rename(&tmp, &manifest_path).map_err(|e| LibraryError::io(&manifest_path, e))?;
    sync_dir(&dir).map_err(|e| LibraryError::io(&dir, e))?;
    // The new dump is current: whatever it does not name is garbage (older dumps, leftovers
    // of an interrupted one).
    let keep: Vec<String> = manifest
        .indexes
        .iter()
        .filter_map(|e| e.graph.as_ref())
        .flat_map(|g| g.files.iter().map(|f| f.name.clone()))
        .chain([MANIFEST.to_string()])
        .collect();
    let mut bytes = 0u64;
    for e in std::fs::read_dir(&dir).map_err(|e| LibraryError::io(&dir, e))? {
        let Ok(e) = e else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        } else if let Err(err) = std::fs::remove_file(e.path()) {
            tracing::warn!(file = %e.path().display(), %err, "could not remove an old index file");
        }
    }
    Ok(PersistReport {
        graphs,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Removes the dump folder, if any.
pub fn remove_dump(library_dir: &Path) -> Result<()> {
    let dir = index_dir(library_dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LibraryError::io(&dir, e)),
    }
}

/// Bytes of the current dump on disk (0 when there is none).
pub fn dump_bytes(library_dir: &Path) -> u64 {
    std::fs::read_dir(index_dir(library_dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The stored vectors of one text format: point id -> vector.
pub type StoredVectors<'a> = HashMap<u64, &'a [f32]>;

/// Loads the persisted indexes if they match the store exactly; `stored` gives, per text
/// format, the vectors an index of that format must hold. Never panics on bad files.
pub fn load(
    library_dir: &Path,
    dim: usize,
    config: &IndexConfig,
    stored: &HashMap<TextFormat, StoredVectors<'_>>,
) -> std::result::Result<HashMap<TextFormat, VectorIndex>, RebuildReason> {
    let dir = index_dir(library_dir);
    let manifest_path = dir.join(MANIFEST);
    let raw = match std::fs::read(&manifest_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(RebuildReason::Missing),
        Err(e) => {
            return Err(RebuildReason::Corrupt(format!(
                "reading {}: {e}",
                manifest_path.display()
            )))
        }
    };
    // The version first, so that a future layout reads as incompatible, not corrupt.
    let version = serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .and_then(|v| v.get("format_version")?.as_u64());
    match version {
        None => return Err(RebuildReason::Corrupt("unreadable manifest".into())),
        Some(v) if v != FORMAT_VERSION as u64 => {
            return Err(RebuildReason::Incompatible(format!(
                "format version {v}, this roe reads {FORMAT_VERSION}"
            )))
        }
        Some(_) => {}
    }
    let m: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| RebuildReason::Corrupt(format!("manifest: {e}")))?;
    if m.dim != dim {
        return Err(RebuildReason::Incompatible(format!(
            "{} dimensions, the encoder has {dim}",
            m.dim
        )));
    }
    let want = GraphSettings::from(config);
    if m.settings != want {
        return Err(RebuildReason::Incompatible(format!(
            "built with {:?}, configured {want:?}",
            m.settings
        )));
    }
    let mut formats: Vec<TextFormat> = m.indexes.iter().map(|e| e.format).collect();
    formats.sort_by_key(|f| f.as_str());
    let mut expected: Vec<TextFormat> = stored.keys().copied().collect();
    expected.sort_by_key(|f| f.as_str());
    if formats != expected {
        return Err(RebuildReason::Corrupt(format!(
            "manifest covers {formats:?}, expected {expected:?}"
        )));
    }
    let vectors_of = |f: TextFormat| {
        stored
            .get(&f)
            .ok_or_else(|| RebuildReason::Corrupt(format!("no {} index expected", f.as_str())))
    };
    // Cheap checks for every index before any expensive one.
    for e in &m.indexes {
        let (n, sha) = points_fingerprint(vectors_of(e.format)?.keys().copied());
        if n != e.live_points || sha != e.points_sha256 {
            return Err(RebuildReason::Stale(format!(
                "{} index: {} points persisted, {n} stored{}",
                e.format.as_str(),
                e.live_points,
                if n == e.live_points {
                    " (different ones)"
                } else {
                    ""
                }
            )));
        }
    }
    for g in m.indexes.iter().filter_map(|e| e.graph.as_ref()) {
        let names: Vec<String> = config
            .engine
            .file_suffixes()
            .iter()
            .chain(&[".rows"])
            .map(|s| format!("{}{s}", g.basename))
            .collect();
        let listed: Vec<&str> = g.files.iter().map(|f| f.name.as_str()).collect();
        if listed != names.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(RebuildReason::Corrupt(format!(
                "manifest lists {listed:?} for graph {}",
                g.basename
            )));
        }
        for f in &g.files {
            let path = dir.join(&f.name);
            let len = std::fs::metadata(&path)
                .map_err(|e| RebuildReason::Corrupt(format!("{}: {e}", path.display())))?
                .len();
            if len != f.bytes {
                return Err(RebuildReason::Corrupt(format!(
                    "{} has {len} bytes, {} were written",
                    f.name, f.bytes
                )));
            }
            let (_, sha) = file_sha256(&path)
                .map_err(|e| RebuildReason::Corrupt(format!("{}: {e}", path.display())))?;
            if sha != f.sha256 {
                return Err(RebuildReason::Corrupt(format!(
                    "{} does not match its checksum",
                    f.name
                )));
            }
        }
    }
    let mut out = HashMap::new();
    for e in &m.indexes {
        let vectors = vectors_of(e.format)?;
        let index = match &e.graph {
            Some(g) => VectorIndex::load_graph(dim, config.clone(), &dir, &g.basename, vectors)
                .map_err(|err| RebuildReason::Corrupt(err.to_string()))?,
            None => {
                // An index without a graph holds fewer points than the threshold (or none):
                // it is an exact scan of the stored vectors, in point id order.
                if !vectors.is_empty() && vectors.len() >= config.hnsw_threshold {
                    return Err(RebuildReason::Corrupt(format!(
                        "{} index persisted without a graph holds {} points",
                        e.format.as_str(),
                        vectors.len()
                    )));
                }
                let mut items: Vec<(u64, &[f32])> = vectors.iter().map(|(p, v)| (*p, *v)).collect();
                items.sort_unstable_by_key(|(p, _)| *p);
                let mut index = VectorIndex::new(dim, config.clone());
                index
                    .insert(&items)
                    .map_err(|err| RebuildReason::Corrupt(err.to_string()))?;
                index
            }
        };
        out.insert(e.format, index);
    }
    Ok(out)
}

/// Keeps one library's dump in step with its routing state: dumps are serialised (a
/// graceful [`crate::library::ExpertLibrary::persist_index`] never races the background
/// dump after a compaction), and version counters say whether the dump on disk reflects the
/// routing state as it is.
pub(crate) struct Dumps {
    lock: Mutex<()>,
    /// Writes applied to the routing state so far (bumped under its write lock).
    applied: AtomicU64,
    /// The `applied` count the dump on disk reflects.
    persisted: AtomicU64,
    library_dir: PathBuf,
    dim: usize,
    config: IndexConfig,
}

impl Dumps {
    /// `current`: the dump on disk reflects the routing state as opened (it was reloaded).
    pub(crate) fn new(library_dir: &Path, dim: usize, config: &IndexConfig, current: bool) -> Self {
        Self {
            lock: Mutex::new(()),
            applied: AtomicU64::new(u64::from(!current)),
            persisted: AtomicU64::new(0),
            library_dir: library_dir.to_path_buf(),
            dim,
            config: config.clone(),
        }
    }

    /// A write reached the routing state: call with its write lock held.
    pub(crate) fn changed(&self) {
        self.applied.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes applied so far; stable while the routing state's read lock is held.
    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// One dump at a time: hold this while checking and writing.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock()
    }

    /// The dump on disk reflects the routing state at `version`.
    pub(crate) fn is_persisted(&self, _held: &MutexGuard<'_, ()>, version: u64) -> bool {
        self.persisted.load(Ordering::SeqCst) == version
    }

    /// Writes `indexes`, which reflect the routing state at `version`, as the current dump.
    pub(crate) fn write(
        &self,
        _held: &MutexGuard<'_, ()>,
        version: u64,
        indexes: &[(TextFormat, &VectorIndex)],
    ) -> Result<PersistReport> {
        let report = persist(&self.library_dir, self.dim, &self.config, indexes)?;
        self.persisted.store(version, Ordering::SeqCst);
        Ok(report)
    }
}
