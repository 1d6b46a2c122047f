//! The expert library: the facade the services call. It owns the durable store, the encoder
//! and the routing state, and keeps them consistent: a write is embedded first, committed to
//! the store ([`crate::library_store`]: sled, or PostgreSQL shared by replicas), and only then
//! made visible to routing.
//!
//! Every committed write has a seq in the store's change log, and the routing state, the
//! experts' metadata and the quota counts here are the store's as of the applied seq. A
//! replica on a shared store applies other replicas' writes from the log
//! ([`ExpertLibrary::catch_up`], run by [`ExpertLibrary::follow`]), always in seq order:
//! before applying its own write it applies every earlier one.
//!
//! Nothing slow happens on the request path: compacting an index (minutes of HNSW rebuild at
//! a million vectors) and dumping it afterwards run on the library's background worker
//! ([`crate::compaction`]), so Route and writes keep going meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::compaction::{CompactionContext, CompactionHold, Compactor};
use crate::embedding::Encoder;
use crate::error::{LibraryError, Result};
use crate::expert::{
    validate_expert_id, BackboneSpec, ExpertMeta, Instance, PeftAdapter, TextFormat, TrainingRecord,
};
use crate::follow::{backoff, FollowState, ReplicationStatus, SeqWatch};
use crate::index::IndexConfig;
use crate::library_store::{Change, ChangeOp, Expect, LibraryStore, Quota, SnapshotItem};
use crate::merge::{merge_adapters, normalise_weights, MergeRequest, MAX_MERGE_SOURCES};
use crate::persist::{Dumps, IndexLoad, PersistReport, RebuildReason, StoredVectors};
use crate::retrieval::{
    ExpertChange, InstanceVectors, Query, RouteOptions, RouteResult, RoutingState,
};
use crate::route_cache::{RouteCache, RouteCacheStats};
use crate::store::{CompactReport, SledStore, StoredInstance};

/// Most bytes of an expert's name.
pub const MAX_NAME_BYTES: usize = 1024;

/// Names and descriptions within their limits, a refusal naming the one that is not.
fn check_name_and_description(name: &str, description: &str, limits: &Limits) -> Result<()> {
    if name.len() > MAX_NAME_BYTES {
        return Err(LibraryError::invalid(
            "name",
            format!("{} bytes, at most {MAX_NAME_BYTES}", name.len()),
        ));
    }
    if description.len() > limits.max_text_bytes {
        return Err(LibraryError::invalid(
            "description",
            format!(
                "{} bytes, at most {}",
                description.len(),
                limits.max_text_bytes
            ),
        ));
    }
    Ok(())
}

/// Most experts one `list` call returns.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Bounds on what one request may carry; past them a client gets RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_instances_per_request: usize,
    pub max_instances_per_expert: usize,
    pub max_queries: usize,
    /// Most bytes of one input or target.
    pub max_text_bytes: usize,
    pub max_choices: usize,
    /// Most bytes of one choice.
    pub max_choice_bytes: usize,
    /// Most bytes of text (inputs and choices) in one Route request: the encoder tokenizes
    /// all of it before truncating, so this bounds the work of one call.
    pub max_route_text_bytes: usize,
    /// Quota: most experts in the library.
    pub max_experts: usize,
    /// Quota: most bytes the library may hold (adapters, instances and their vectors).
    pub max_library_bytes: u64,
    /// Most bytes of one adapter's weights file. Below the 64 MiB gRPC message so that an
    /// expert registered can always be read back whole (GetExpert, a split inference
    /// process loading it).
    pub max_adapter_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances_per_request: 10_000,
            max_instances_per_expert: 100_000,
            max_queries: 1024,
            max_text_bytes: 64 * 1024,
            max_choices: 64,
            max_choice_bytes: 4 * 1024,
            max_route_text_bytes: 1 << 20,
            max_experts: 100_000,
            max_library_bytes: 64 << 30,
            max_adapter_bytes: 60 << 20,
        }
    }
}

/// Bytes an instance takes in the store (texts, vectors, bookkeeping), for the quota.
fn stored_bytes(si: &StoredInstance) -> u64 {
    let i = &si.instance;
    let text = i.input.len()
        + i.choices.iter().map(|c| c.len() + 8).sum::<usize>()
        + i.target.as_ref().map_or(0, String::len);
    let vectors = 4 * (si.embedding.len() + si.choice_embedding.as_ref().map_or(0, Vec::len));
    (text + vectors + si.expert_id.len() + 64) as u64
}

/// What the library holds, for its quotas: bytes per expert and in all.
#[derive(Debug, Default)]
struct Usage {
    per_expert: HashMap<String, u64>,
    total: u64,
}

impl Usage {
    fn set(&mut self, id: &str, bytes: u64) {
        let old = self.per_expert.insert(id.to_string(), bytes).unwrap_or(0);
        self.total = self.total - old + bytes;
    }
    fn remove(&mut self, id: &str) {
        self.total -= self.per_expert.remove(id).unwrap_or(0);
    }
    fn of(&self, id: &str) -> u64 {
        self.per_expert.get(id).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct LibraryConfig {
    pub index: IndexConfig,
    pub limits: Limits,
    /// Backbones experts may be registered for; the first is the default.
    pub backbones: Vec<BackboneSpec>,
    /// Persist the index graphs when the library is dropped, if they changed since they were
    /// loaded or last persisted (see [`ExpertLibrary::persist_index`]).
    pub persist_index_on_drop: bool,
    /// Opening compacts the store (copies its live data into fresh sled files, see
    /// [`SledStore::compact_if_worthwhile`]) when more than half of its files is garbage
    /// left by deleted and replaced experts and that garbage is more than this many bytes.
    /// `0` turns compaction at open off (an interrupted compaction is still finished or
    /// undone at open); `1` compacts whenever more than half is garbage.
    pub compact_store_min_waste_bytes: u64,
    /// Memory for the results of routes already answered ([`crate::route_cache`]; bytes, 0:
    /// no cache): the same queries and options on an unchanged library cost a lookup.
    pub route_cache_bytes: u64,
}

/// A useful [`LibraryConfig::route_cache_bytes`]: 16 MiB (~1,500 routes of Q=32 with their
/// evidence). Off by default (0).
pub const DEFAULT_ROUTE_CACHE_BYTES: u64 = 16 << 20;

/// Default of [`LibraryConfig::compact_store_min_waste_bytes`]: 16 MiB.
pub const DEFAULT_COMPACT_STORE_MIN_WASTE_BYTES: u64 = 16 << 20;

impl Default for LibraryConfig {
    fn default() -> Self {
        Self {
            index: IndexConfig::default(),
            limits: Limits::default(),
            backbones: vec![BackboneSpec::smollm2_135m()],
            persist_index_on_drop: true,
            compact_store_min_waste_bytes: DEFAULT_COMPACT_STORE_MIN_WASTE_BYTES,
            route_cache_bytes: 0,
        }
    }
}

/// What a client hands in to register an expert.
#[derive(Debug, Clone)]
pub struct NewExpert {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Backbone name; `None` means the library's default backbone.
    pub backbone: Option<String>,
    pub adapter: PeftAdapter,
    pub instances: Vec<Instance>,
}

/// How a write may be made: a compare-and-set on the expert's version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// The version the expert must be at for the write to apply (ABORTED otherwise).
    pub expected_version: Option<u64>,
}

/// A committed write's result and the change log's seq it committed at: a read that passes
/// it as `min_library_seq` to any replica sees this write.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed<T> {
    pub value: T,
    pub library_seq: u64,
}

/// Times a write re-reads the log and tries again after another replica's write to the same
/// expert overtook it (only when the caller gave no expected version).
const WRITE_RETRIES: usize = 4;

pub struct ExpertLibrary {
    store: Arc<dyn LibraryStore>,
    encoder: Arc<dyn Encoder>,
    /// Shared with the compaction worker, which swaps compacted indexes in.
    state: Arc<RwLock<RoutingState>>,
    /// Serialises writes so that read-check-write sequences (ALREADY_EXISTS) are atomic.
    writes: Arc<Mutex<()>>,
    config: LibraryConfig,
    /// Whether the dump on disk (`<dir>/roe-index/`) is current; serialises dumps.
    dumps: Arc<Dumps>,
    compactor: Compactor,
    route_cache: Option<RouteCache>,
    /// Changed under `writes` only.
    usage: Mutex<Usage>,
    /// Every expert's metadata as of the applied seq (changed under `writes` only): reads
    /// answer from memory, also while a shared store is unreachable.
    metas: RwLock<BTreeMap<String, ExpertMeta>>,
    /// The change log's seq the state above is at.
    seq: Arc<SeqWatch>,
    follow: Mutex<FollowState>,
}

/// How long opening took and what it loaded, for logs and the start-up benchmark.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub experts: usize,
    pub vectors: usize,
    pub seconds: f64,
    /// Whether the index graphs were reloaded from disk or rebuilt (and why).
    pub index: IndexLoad,
    /// Of `seconds`, the time spent loading or building the index.
    pub index_seconds: f64,
    /// The compaction of the store done before loading it, if it was worthwhile (see
    /// [`LibraryConfig::compact_store_min_waste_bytes`]).
    pub store_compaction: Option<CompactReport>,
}

impl ExpertLibrary {
    /// Opens (or creates) the library in `dir` and restores the routing state from it: the
    /// index graphs are reloaded from the last [`Self::persist_index`] when that dump matches
    /// the store exactly, and rebuilt from the stored vectors otherwise (see
    /// [`crate::persist`]). A bad dump never fails opening.
    pub fn open(
        dir: impl AsRef<Path>,
        encoder: Arc<dyn Encoder>,
        config: LibraryConfig,
    ) -> Result<(Self, OpenReport)> {
        let started = Instant::now();
        if config.backbones.is_empty() {
            return Err(LibraryError::invalid("backbones", "at least one is needed"));
        }
        let dir = dir.as_ref().to_path_buf();
        // The store is compacted (its files swapped) before it is opened for use; a failed
        // copy leaves it as it was and is only logged.
        let (store, store_compaction) = match config.compact_store_min_waste_bytes {
            0 => (SledStore::open(&dir)?, None),
            min => SledStore::open_compacting(&dir, min)?,
        };
        Self::open_on(
            Arc::new(store),
            &dir,
            encoder,
            config,
            store_compaction,
            started,
        )
    }

    /// Opens a library whose source of truth is `store` (PostgreSQL shared by replicas);
    /// `dir` holds only this replica's dump of its index. The routing state is built from one
    /// snapshot of the store and then follows its change log ([`Self::follow`]).
    pub fn open_shared(
        store: Arc<dyn LibraryStore>,
        dir: impl AsRef<Path>,
        encoder: Arc<dyn Encoder>,
        config: LibraryConfig,
    ) -> Result<(Self, OpenReport)> {
        let started = Instant::now();
        if config.backbones.is_empty() {
            return Err(LibraryError::invalid("backbones", "at least one is needed"));
        }
        std::fs::create_dir_all(dir.as_ref()).map_err(|e| LibraryError::io(dir.as_ref(), e))?;
        Self::open_on(store, dir.as_ref(), encoder, config, None, started)
    }

    fn open_on(
        store: Arc<dyn LibraryStore>,
        dir: &Path,
        encoder: Arc<dyn Encoder>,
        config: LibraryConfig,
        store_compaction: Option<CompactReport>,
        started: Instant,
    ) -> Result<(Self, OpenReport)> {
        let dir = dir.to_path_buf();
        store.check_encoder(encoder.id())?;
        let dim = encoder.dim();
        let mut by_expert: HashMap<String, Vec<StoredInstance>> = HashMap::new();
        let mut metas = Vec::new();
        let snapshot_seq = store.snapshot(&mut |item| {
            match item {
                SnapshotItem::Meta(m) => metas.push(*m),
                SnapshotItem::Instance(si) => {
                    by_expert.entry(si.expert_id.clone()).or_default().push(si)
                }
            }
            Ok(())
        })?;
        // Instances of experts that exist (a committed write keeps both in step).
        let experts: Vec<(&ExpertMeta, Vec<StoredInstance>)> = metas
            .iter()
            .map(|m| (m, by_expert.remove(&m.id).unwrap_or_default()))
            .collect();
        drop(by_expert);
        let mut usage = Usage::default();
        for (meta, rows) in &experts {
            let bytes = meta.weights_bytes as u64 + rows.iter().map(stored_bytes).sum::<u64>();
            usage.set(&meta.id, bytes);
        }
        let index_started = Instant::now();
        let loaded = {
            let mut stored: HashMap<TextFormat, StoredVectors<'_>> = HashMap::new();
            let (mut plain, mut choice) = (HashMap::new(), HashMap::new());
            for r in experts.iter().flat_map(|(_, rows)| rows) {
                plain.insert(r.point_id, r.embedding.as_slice());
                if let Some(c) = &r.choice_embedding {
                    choice.insert(r.point_id, c.as_slice());
                }
            }
            stored.insert(TextFormat::Instance, plain);
            stored.insert(TextFormat::ChoiceInstance, choice);
            crate::persist::load(&dir, dim, &config.index, &stored)
        };
        let (state, index) = match loaded {
            Ok(indexes) => {
                let mut state = RoutingState::with_indexes(dim, indexes)?;
                state.add_all(
                    experts
                        .iter()
                        .map(|(meta, rows)| (meta.id.as_str(), meta.kind, vectors_of(rows))),
                    true,
                )?;
                (state, IndexLoad::Reloaded)
            }
            Err(reason) => {
                let mut state = RoutingState::new(dim, config.index.clone());
                state.add_all(
                    experts
                        .iter()
                        .map(|(meta, rows)| (meta.id.as_str(), meta.kind, vectors_of(rows))),
                    false,
                )?;
                (state, IndexLoad::Rebuilt(reason))
            }
        };
        let index_seconds = index_started.elapsed().as_secs_f64();
        match &index {
            IndexLoad::Reloaded => tracing::info!(
                seconds = index_seconds,
                "index graphs reloaded from {}",
                crate::persist::index_dir(&dir).display()
            ),
            // Expected for new and small libraries: nothing to warn about.
            IndexLoad::Rebuilt(RebuildReason::Missing) => tracing::info!(
                seconds = index_seconds,
                hnsw = state.uses_hnsw(),
                "index built from the store: no persisted index"
            ),
            IndexLoad::Rebuilt(reason) => tracing::warn!(
                seconds = index_seconds,
                hnsw = state.uses_hnsw(),
                "index rebuilt from the store: {reason}"
            ),
        }
        let report = OpenReport {
            experts: metas.len(),
            vectors: state.num_vectors(),
            seconds: started.elapsed().as_secs_f64(),
            index_seconds,
            index: index.clone(),
            store_compaction,
        };
        tracing::info!(
            experts = report.experts,
            vectors = report.vectors,
            seconds = report.seconds,
            hnsw = state.uses_hnsw(),
            reloaded = index.is_reloaded(),
            "expert library opened"
        );
        drop(experts);
        let metas: BTreeMap<String, ExpertMeta> =
            metas.into_iter().map(|m| (m.id.clone(), m)).collect();
        // A rebuilt graph is worth persisting; a reloaded one is on disk already.
        let dumps = Arc::new(Dumps::new(&dir, dim, &config.index, index.is_reloaded()));
        let due = state.needs_compaction();
        let route_cache =
            (config.route_cache_bytes > 0).then(|| RouteCache::new(config.route_cache_bytes));
        let state = Arc::new(RwLock::new(state));
        let writes = Arc::new(Mutex::new(()));
        let compactor = Compactor::spawn(CompactionContext {
            state: state.clone(),
            writes: writes.clone(),
            dumps: dumps.clone(),
        })?;
        if due {
            compactor.request();
        }
        Ok((
            Self {
                store,
                encoder,
                state,
                writes,
                config,
                dumps,
                compactor,
                route_cache,
                usage: Mutex::new(usage),
                metas: RwLock::new(metas),
                seq: Arc::new(SeqWatch::new(snapshot_seq)),
                follow: Mutex::new(FollowState {
                    head_seq: snapshot_seq,
                    ..FollowState::default()
                }),
            },
            report,
        ))
    }

    /// Writes the index graphs next to the store (`<dir>/roe-index/`, see [`crate::persist`])
    /// so that the next open reloads them instead of rebuilding, when they changed since they
    /// were loaded or last persisted; `None` when they had not. Writes wait for it; routing
    /// does not. At a million vectors it writes a few GB (the graph and its vectors). It
    /// waits for a background dump in progress (after a compaction) and never races it; a
    /// compaction still being built is not waited for (its result is dumped by the worker).
    pub fn persist_index(&self) -> Result<Option<PersistReport>> {
        // Lock order: dumps, writes, routing state (the worker never holds two at once).
        let held = self.dumps.lock();
        let _w = self.writes.lock();
        let state = self.state.read();
        let version = self.dumps.applied();
        if self.dumps.is_persisted(&held, version) {
            return Ok(None);
        }
        let report = self.dumps.write(&held, version, &state.indexes())?;
        tracing::info!(
            graphs = report.graphs,
            bytes = report.bytes,
            seconds = report.seconds,
            vectors = state.num_vectors(),
            "index persisted"
        );
        Ok(Some(report))
    }

    /// Writes an expert version (durably, replacing the stored one when `expect` allows) and
    /// makes it routable: the old version's instances leave the index, the new ones enter it.
    /// Called under the write lock: the quotas are checked here, once, for every way an
    /// expert is written (registered, trained, merged), against this replica's view, and
    /// again by a shared store inside its transaction. Returns the write's seq.
    fn store_and_index(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        rows: &[StoredInstance],
        expect: Expect,
    ) -> Result<u64> {
        let l = &self.config.limits;
        self.check_adapter_bytes(adapter.safetensors.len())?;
        let (held, replacing) = {
            let metas = self.metas.read();
            (metas.len(), metas.contains_key(&meta.id))
        };
        if !replacing && held >= l.max_experts {
            return Err(LibraryError::ResourceExhausted(format!(
                "experts: the library holds {held}, the quota max_experts is {}",
                l.max_experts
            )));
        }
        let bytes = meta.weights_bytes as u64 + rows.iter().map(stored_bytes).sum::<u64>();
        self.check_library_bytes(&meta.id, bytes)?;
        let quota = Quota {
            max_experts: l.max_experts,
            max_library_bytes: l.max_library_bytes,
            expert_bytes: bytes,
        };
        let written = self.store.put_expert(meta, adapter, rows, expect, &quota)?;
        let change = Change {
            seq: written.seq,
            op: ChangeOp::Put,
            expert_id: meta.id.clone(),
            version: meta.version,
            meta: Some(meta.clone()),
            removed_points: written.removed_points,
        };
        self.apply_committed(&change, rows)?;
        Ok(written.seq)
    }

    pub fn encoder(&self) -> &Arc<dyn Encoder> {
        &self.encoder
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Bytes the library holds by its quota's count (not the store's files on disk).
    pub fn stored_bytes(&self) -> u64 {
        self.usage.lock().total
    }

    /// An adapter's weights file against `max_adapter_bytes` (uploads check it as bytes
    /// arrive, before holding them all).
    pub fn check_adapter_bytes(&self, bytes: usize) -> Result<()> {
        let max = self.config.limits.max_adapter_bytes;
        if bytes > max {
            return Err(LibraryError::ResourceExhausted(format!(
                "adapter.adapter_model_safetensors: {bytes} bytes, the limit max_adapter_bytes \
                 is {max}"
            )));
        }
        Ok(())
    }

    /// Whether expert `id` may hold `bytes` (replacing what it holds now).
    fn check_library_bytes(&self, id: &str, bytes: u64) -> Result<()> {
        let max = self.config.limits.max_library_bytes;
        let usage = self.usage.lock();
        let after = usage.total - usage.of(id) + bytes;
        if after > max {
            return Err(LibraryError::ResourceExhausted(format!(
                "library: holds {} bytes; {id} would bring it to {after}, past the quota \
                 max_library_bytes {max}",
                usage.total
            )));
        }
        Ok(())
    }

    pub fn backbone(&self, name: Option<&str>) -> Result<&BackboneSpec> {
        match name {
            None | Some("") => Ok(&self.config.backbones[0]),
            Some(n) => self
                .config
                .backbones
                .iter()
                .find(|b| b.name == n)
                .ok_or_else(|| {
                    LibraryError::invalid(
                        "backbone",
                        format!(
                            "unknown backbone {n:?}; this library serves {:?}",
                            self.config
                                .backbones
                                .iter()
                                .map(|b| &b.name)
                                .collect::<Vec<_>>()
                        ),
                    )
                }),
        }
    }

    fn check_instances(&self, instances: &[Instance], field: &str) -> Result<()> {
        let l = &self.config.limits;
        if instances.len() > l.max_instances_per_request {
            return Err(LibraryError::ResourceExhausted(format!(
                "{field}: {} instances, at most {} per request",
                instances.len(),
                l.max_instances_per_request
            )));
        }
        for (i, inst) in instances.iter().enumerate() {
            check_text(&inst.input, &format!("{field}[{i}].input"), l)?;
            check_choices(&inst.choices, &format!("{field}[{i}].choices"), l)?;
            if let Some(t) = &inst.target {
                if t.len() > l.max_text_bytes {
                    return Err(LibraryError::ResourceExhausted(format!(
                        "{field}[{i}].target is {} bytes, at most {}",
                        t.len(),
                        l.max_text_bytes
                    )));
                }
            }
        }
        Ok(())
    }

    /// Embeds instances in both text formats; instances without choices share one vector.
    fn embed_instances(&self, instances: &[Instance]) -> Result<Vec<StoredInstance>> {
        let plain: Vec<String> = instances.iter().map(|i| i.input.clone()).collect();
        let with_choices: Vec<(usize, String)> = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.choices.is_empty())
            .map(|(n, i)| (n, TextFormat::ChoiceInstance.render(&i.input, &i.choices)))
            .collect();
        let mut texts = plain;
        texts.extend(with_choices.iter().map(|(_, t)| t.clone()));
        let mut vectors = self.encoder.embed(&texts)?;
        let choice_vectors = vectors.split_off(instances.len());
        let mut choice_of: HashMap<usize, Vec<f32>> = with_choices
            .iter()
            .map(|(n, _)| *n)
            .zip(choice_vectors)
            .collect();
        let point_ids = self.store.next_point_ids(instances.len())?;
        Ok(instances
            .iter()
            .zip(vectors)
            .zip(point_ids)
            .enumerate()
            .map(|(n, ((inst, v), point_id))| StoredInstance {
                point_id,
                expert_id: String::new(),
                instance: inst.clone(),
                embedding: v,
                choice_embedding: choice_of.remove(&n),
            })
            .collect())
    }

    /// Registers an expert. With `new_version` an existing id is replaced by the next
    /// version; without it an existing id is ALREADY_EXISTS. Durable once it returns.
    pub fn register(&self, new: NewExpert, new_version: bool) -> Result<ExpertMeta> {
        Ok(self
            .register_with(new, new_version, None, WriteOptions::default())?
            .value)
    }

    /// [`Self::register`] for an expert trained inside roe: its metadata keeps `training`.
    pub fn register_trained(
        &self,
        new: NewExpert,
        new_version: bool,
        training: Option<TrainingRecord>,
    ) -> Result<ExpertMeta> {
        Ok(self
            .register_with(new, new_version, training, WriteOptions::default())?
            .value)
    }

    /// [`Self::register`] with a compare-and-set (`options.expected_version`, which implies a
    /// new version) and the seq it committed at.
    pub fn register_with(
        &self,
        new: NewExpert,
        new_version: bool,
        training: Option<TrainingRecord>,
        options: WriteOptions,
    ) -> Result<Committed<ExpertMeta>> {
        let new_version = new_version || options.expected_version.is_some();
        validate_expert_id(&new.id)?;
        check_name_and_description(&new.name, &new.description, &self.config.limits)?;
        let spec = self.backbone(new.backbone.as_deref())?.clone();
        let summary = new.adapter.validate(&spec)?;
        if new.instances.is_empty() {
            return Err(LibraryError::invalid(
                "instances",
                "an expert needs at least one instance of its task to be routable",
            ));
        }
        self.check_instances(&new.instances, "instances")?;
        if new.instances.len() > self.config.limits.max_instances_per_expert {
            return Err(LibraryError::ResourceExhausted(format!(
                "instances: at most {} per expert",
                self.config.limits.max_instances_per_expert
            )));
        }
        // Cheap early check; repeated under the write lock below.
        expectation(
            &new.id,
            self.metas.read().get(&new.id),
            new_version,
            options,
        )?;
        let started = Instant::now();
        let mut rows = self.embed_instances(&new.instances)?;
        for r in &mut rows {
            r.expert_id = new.id.clone();
        }
        let _w = self.writes.lock();
        let mut tries = 0;
        let (meta, seq) = loop {
            self.catch_up_locked()?;
            let expect = expectation(
                &new.id,
                self.metas.read().get(&new.id),
                new_version,
                options,
            )?;
            let meta = ExpertMeta {
                id: new.id.clone(),
                name: if new.name.is_empty() {
                    new.id.clone()
                } else {
                    new.name.clone()
                },
                description: new.description.clone(),
                kind: summary.peft_type().into(),
                backbone: spec.name.clone(),
                version: version_after(expect),
                created_at_unix_ms: now_ms(),
                num_instances: rows.len(),
                weights_sha256: new.adapter.sha256_hex(),
                safetensors_sha256: new.adapter.safetensors_sha256_hex(),
                weights_bytes: new.adapter.safetensors.len(),
                adapter: summary.clone(),
                training: training.clone(),
            };
            match self.store_and_index(&meta, &new.adapter, &rows, expect) {
                Ok(seq) => break (meta, seq),
                Err(e) if overtaken(&e, options) && tries < WRITE_RETRIES => tries += 1,
                Err(e) => return Err(e),
            }
        };
        tracing::info!(
            id = %meta.id,
            version = meta.version,
            kind = meta.kind.as_str(),
            instances = meta.num_instances,
            ms = started.elapsed().as_millis() as u64,
            "expert registered"
        );
        Ok(Committed {
            value: meta,
            library_seq: seq,
        })
    }

    /// Merges experts of one kind into a new expert `req.id` (see [`crate::merge`] for the
    /// math and the weights) and registers it with the union of the sources' instances
    /// (identical instances once), reusing their stored embeddings. Atomic and durable like
    /// [`Self::register`]; an existing id is ALREADY_EXISTS unless `req.new_version`. The
    /// union must stay within `max_instances_per_expert`.
    pub fn merge(&self, req: MergeRequest) -> Result<ExpertMeta> {
        Ok(self.merge_with(req, WriteOptions::default())?.value)
    }

    /// [`Self::merge`] with a compare-and-set on `req.id` and the seq it committed at.
    pub fn merge_with(
        &self,
        req: MergeRequest,
        options: WriteOptions,
    ) -> Result<Committed<ExpertMeta>> {
        let new_version = req.new_version || options.expected_version.is_some();
        validate_expert_id(&req.id)?;
        check_name_and_description(&req.name, &req.description, &self.config.limits)?;
        if req.sources.is_empty() {
            return Err(LibraryError::invalid(
                "sources",
                "at least one source is needed",
            ));
        }
        if req.sources.len() > MAX_MERGE_SOURCES {
            return Err(LibraryError::invalid(
                "sources",
                format!("{} sources, at most {MAX_MERGE_SOURCES}", req.sources.len()),
            ));
        }
        let mut listed = HashSet::new();
        for (i, s) in req.sources.iter().enumerate() {
            if s.is_empty() {
                return Err(LibraryError::invalid(
                    format!("sources[{i}].expert_id"),
                    "is empty",
                ));
            }
            // An id no expert could have is the caller's mistake, not a missing expert.
            validate_expert_id(s).map_err(|e| match e {
                LibraryError::InvalidArgument { message, .. } => {
                    LibraryError::invalid(format!("sources[{i}].expert_id"), message)
                }
                other => other,
            })?;
            if !listed.insert(s.as_str()) {
                return Err(LibraryError::invalid(
                    "sources",
                    format!("{s:?} is listed more than once"),
                ));
            }
        }
        // Weight errors before any reading: a bad request costs nothing.
        normalise_weights(req.sources.len(), req.weights.as_deref())?;
        let started = Instant::now();
        // Sources are read under the write lock so that the merge sees one state of them and
        // no write to a source (or to `req.id`) interleaves with it. Merging only copies and
        // scales matrices (no encoder, no matrix products), so the lock is held briefly.
        let _w = self.writes.lock();
        self.catch_up_locked()?;
        // Another replica's write to `req.id` between here and the commit is ABORTED by the
        // store (the merge read its sources under this replica's lock only).
        let expect = expectation(
            &req.id,
            self.metas.read().get(&req.id),
            new_version,
            options,
        )?;
        let metas = req
            .sources
            .iter()
            .map(|s| self.get(s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(m) = metas.iter().find(|m| m.kind != metas[0].kind) {
            return Err(LibraryError::invalid(
                "sources",
                format!(
                    "all sources must be of one kind: {} is {}, {} is {}",
                    metas[0].id,
                    metas[0].kind.as_str(),
                    m.id,
                    m.kind.as_str()
                ),
            ));
        }
        if let Some(m) = metas.iter().find(|m| m.backbone != metas[0].backbone) {
            return Err(LibraryError::invalid(
                "sources",
                format!(
                    "all sources must be for one backbone: {} is for {}, {} for {}",
                    metas[0].id, metas[0].backbone, m.id, m.backbone
                ),
            ));
        }
        let spec = self.backbone(Some(&metas[0].backbone))?.clone();
        let adapters = req
            .sources
            .iter()
            .map(|s| self.adapter(s))
            .collect::<Result<Vec<_>>>()?;
        let merged = merge_adapters(&adapters, req.weights.as_deref(), req.prompt_mode, &spec)?;
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for s in &req.sources {
            for si in self.store.instances_of(s)? {
                let i = &si.instance;
                if seen.insert((i.input.clone(), i.target.clone(), i.choices.clone())) {
                    rows.push(si);
                }
            }
        }
        let max = self.config.limits.max_instances_per_expert;
        if rows.len() > max {
            return Err(LibraryError::ResourceExhausted(format!(
                "instances: the sources hold {} distinct instances together, at most {max} per \
                 expert",
                rows.len()
            )));
        }
        let point_ids = self.store.next_point_ids(rows.len())?;
        for (r, point_id) in rows.iter_mut().zip(point_ids) {
            r.point_id = point_id;
            r.expert_id = req.id.clone();
        }
        let description = if req.description.is_empty() {
            merge_description(&req.sources, &merged.weights)
        } else {
            req.description
        };
        let meta = ExpertMeta {
            id: req.id.clone(),
            name: if req.name.is_empty() {
                req.id.clone()
            } else {
                req.name
            },
            description,
            kind: merged.summary.peft_type().into(),
            backbone: spec.name.clone(),
            version: version_after(expect),
            created_at_unix_ms: now_ms(),
            num_instances: rows.len(),
            weights_sha256: merged.adapter.sha256_hex(),
            safetensors_sha256: merged.adapter.safetensors_sha256_hex(),
            weights_bytes: merged.adapter.safetensors.len(),
            adapter: merged.summary,
            training: None,
        };
        let seq = self.store_and_index(&meta, &merged.adapter, &rows, expect)?;
        tracing::info!(
            id = %meta.id,
            version = meta.version,
            kind = meta.kind.as_str(),
            sources = req.sources.len(),
            instances = meta.num_instances,
            ms = started.elapsed().as_millis() as u64,
            "experts merged"
        );
        Ok(Committed {
            value: meta,
            library_seq: seq,
        })
    }

    /// The expert's metadata as of the applied seq (from memory).
    pub fn get(&self, id: &str) -> Result<ExpertMeta> {
        self.metas
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    pub fn adapter(&self, id: &str) -> Result<PeftAdapter> {
        self.store.adapter(id)?.ok_or_else(|| not_found(id))
    }

    pub fn instances(&self, id: &str) -> Result<Vec<Instance>> {
        self.get(id)?;
        Ok(self
            .store
            .instances_of(id)?
            .into_iter()
            .map(|s| s.instance)
            .collect())
    }

    /// Experts in id order after `after`, at most `page_size` (1..=[`MAX_PAGE_SIZE`]), and
    /// whether more follow.
    pub fn list(&self, after: Option<&str>, page_size: usize) -> Result<(Vec<ExpertMeta>, bool)> {
        if page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(LibraryError::invalid(
                "page_size",
                format!("{page_size} is outside 1..={MAX_PAGE_SIZE}"),
            ));
        }
        let metas = self.metas.read();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        // One extra row tells whether another page follows.
        let mut page: Vec<ExpertMeta> = metas
            .range::<str, _>((start, Bound::Unbounded))
            .take(page_size + 1)
            .map(|(_, m)| m.clone())
            .collect();
        let more = page.len() > page_size;
        page.truncate(page_size);
        Ok((page, more))
    }

    pub fn len(&self) -> usize {
        self.metas.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.metas.read().is_empty()
    }

    /// Instance vectors in the routing index.
    pub fn num_vectors(&self) -> usize {
        self.state.read().num_vectors()
    }

    pub fn delete(&self, id: &str) -> Result<ExpertMeta> {
        Ok(self.delete_with(id, WriteOptions::default())?.value)
    }

    /// [`Self::delete`] with a compare-and-set and the seq it committed at.
    pub fn delete_with(&self, id: &str, options: WriteOptions) -> Result<Committed<ExpertMeta>> {
        let _w = self.writes.lock();
        self.catch_up_locked()?;
        let meta = self.get(id)?;
        let expect = options
            .expected_version
            .map_or(Expect::Any, Expect::Version);
        let written = self
            .store
            .delete(id, expect)?
            .ok_or_else(|| not_found(id))?;
        let change = Change {
            seq: written.seq,
            op: ChangeOp::Delete,
            expert_id: id.to_string(),
            version: meta.version,
            meta: None,
            removed_points: written.removed_points,
        };
        self.apply_committed(&change, &[])?;
        tracing::info!(id, "expert deleted");
        Ok(Committed {
            value: meta,
            library_seq: written.seq,
        })
    }

    /// Adds instances to an expert; they are routable on the next request.
    pub fn add_instances(&self, id: &str, instances: Vec<Instance>) -> Result<ExpertMeta> {
        Ok(self
            .add_instances_with(id, instances, WriteOptions::default())?
            .value)
    }

    /// [`Self::add_instances`] with a compare-and-set and the seq it committed at.
    pub fn add_instances_with(
        &self,
        id: &str,
        instances: Vec<Instance>,
        options: WriteOptions,
    ) -> Result<Committed<ExpertMeta>> {
        if instances.is_empty() {
            return Err(LibraryError::invalid("instances", "no instances given"));
        }
        self.check_instances(&instances, "instances")?;
        self.get(id)?;
        let mut rows = self.embed_instances(&instances)?;
        for r in &mut rows {
            r.expert_id = id.to_string();
        }
        let _w = self.writes.lock();
        let mut tries = 0;
        loop {
            self.catch_up_locked()?;
            let mut meta = self.get(id)?;
            let expect = expectation(id, Some(&meta), true, options)?;
            if meta.num_instances + rows.len() > self.config.limits.max_instances_per_expert {
                return Err(LibraryError::ResourceExhausted(format!(
                    "instances: expert {id} would exceed {} instances",
                    self.config.limits.max_instances_per_expert
                )));
            }
            meta.num_instances += rows.len();
            let bytes = self.usage.lock().of(id) + rows.iter().map(stored_bytes).sum::<u64>();
            self.check_library_bytes(id, bytes)?;
            let quota = Quota {
                max_experts: self.config.limits.max_experts,
                max_library_bytes: self.config.limits.max_library_bytes,
                expert_bytes: rows.iter().map(stored_bytes).sum::<u64>(),
            };
            let written = match self.store.append_instances(&meta, &rows, expect, &quota) {
                Ok(w) => w,
                Err(e) if overtaken(&e, options) && tries < WRITE_RETRIES => {
                    tries += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let change = Change {
                seq: written.seq,
                op: ChangeOp::Append,
                expert_id: id.to_string(),
                version: meta.version,
                meta: Some(meta.clone()),
                removed_points: Vec::new(),
            };
            self.apply_committed(&change, &rows)?;
            return Ok(Committed {
                value: meta,
                library_seq: written.seq,
            });
        }
    }

    pub fn check_queries(&self, queries: &[Query]) -> Result<()> {
        let l = &self.config.limits;
        if queries.is_empty() {
            return Err(LibraryError::invalid(
                "queries",
                "at least one query is needed",
            ));
        }
        if queries.len() > l.max_queries {
            return Err(LibraryError::ResourceExhausted(format!(
                "queries: {} given, at most {}",
                queries.len(),
                l.max_queries
            )));
        }
        let mut text_bytes = 0;
        for (i, q) in queries.iter().enumerate() {
            check_text(&q.input, &format!("queries[{i}].input"), l)?;
            check_choices(&q.choices, &format!("queries[{i}].choices"), l)?;
            let target = q.target.as_deref().unwrap_or("");
            if target.len() > l.max_text_bytes {
                return Err(LibraryError::ResourceExhausted(format!(
                    "queries[{i}].target is {} bytes, at most {}",
                    target.len(),
                    l.max_text_bytes
                )));
            }
            text_bytes +=
                q.input.len() + target.len() + q.choices.iter().map(String::len).sum::<usize>();
        }
        if text_bytes > l.max_route_text_bytes {
            return Err(LibraryError::ResourceExhausted(format!(
                "queries: {text_bytes} bytes of text, at most {} in one request",
                l.max_route_text_bytes
            )));
        }
        Ok(())
    }

    pub fn embed_queries(&self, queries: &[Query], format: TextFormat) -> Result<Vec<Vec<f32>>> {
        let texts: Vec<String> = queries
            .iter()
            .map(|q| format.render(&q.input, &q.choices))
            .collect();
        self.encoder.embed(&texts)
    }

    /// Routes a task given by example queries.
    pub fn route(&self, queries: &[Query], options: &RouteOptions) -> Result<RouteResult> {
        self.route_while(queries, options, &|| true)
    }

    /// [`Self::route`] for a request that may be withdrawn: `wanted()` is asked between
    /// encoder batches, and once it is false the work stops with [`LibraryError::Cancelled`].
    pub fn route_while(
        &self,
        queries: &[Query],
        options: &RouteOptions,
        wanted: &dyn Fn() -> bool,
    ) -> Result<RouteResult> {
        self.check_queries(queries)?;
        // Read before routing (see crate::route_cache): a write from now on changes the key.
        let cached = self.route_cache.as_ref().map(|cache| {
            (
                cache,
                RouteCache::key(self.dumps.applied(), queries, options),
            )
        });
        if let Some((cache, key)) = &cached {
            if let Some(hit) = cache.get(key) {
                crate::metrics::routed(hit.abstain);
                return Ok(RouteResult::clone(&hit));
            }
        }
        let mut vectors = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(ROUTE_EMBED_CHUNK) {
            if !wanted() {
                return Err(LibraryError::Cancelled);
            }
            vectors.extend(self.embed_queries(chunk, options.text_format)?);
        }
        if !wanted() {
            return Err(LibraryError::Cancelled);
        }
        let routed = self.route_embedded(queries, &vectors, options)?;
        crate::metrics::routed(routed.abstain);
        if let Some((cache, key)) = cached {
            cache.insert(key, routed.clone());
        }
        Ok(routed)
    }

    /// Hits and misses of the route cache (`None`: no cache configured).
    pub fn route_cache_stats(&self) -> Option<RouteCacheStats> {
        self.route_cache.as_ref().map(RouteCache::stats)
    }

    /// Routes queries whose vectors are already known (benchmarks reuse them across options).
    pub fn route_embedded(
        &self,
        queries: &[Query],
        vectors: &[Vec<f32>],
        options: &RouteOptions,
    ) -> Result<RouteResult> {
        let state = self.state.read();
        if state.num_experts() == 0 {
            return Err(LibraryError::Empty);
        }
        state.route(queries, vectors, options)
    }

    /// Read access to the routing state (benchmarks compare HNSW with exact search).
    pub fn with_state<T>(&self, f: impl FnOnce(&RoutingState) -> T) -> T {
        f(&self.state.read())
    }

    /// Applies a committed write to the routing state and, when it left an index due for
    /// compaction, wakes the background worker (never compacts inline). The index is marked
    /// changed even when applying fails half way.
    ///
    /// The write lock is held only while the rows are stored (routes scan rows not yet in
    /// the graph exactly) and the lexical views, made anew before it, are swapped in; the
    /// graph insertion, or the graph's first build past `hnsw_threshold`, runs after it, so
    /// routes never wait for graph work or lexical refreshes. It ends before the write is
    /// acknowledged. Callers hold `writes`, which serialises graph work and keeps the lexical
    /// views unchanged between their copy and their replacement.
    fn apply(&self, change: ExpertChange<'_>) -> Result<()> {
        let lexical = self.state.read().lexical();
        let lexical = Arc::new(lexical.after(&change));
        let waited = Instant::now();
        let (result, due, held) = {
            let mut state = self.state.write();
            let locked = Instant::now();
            let result = state.apply(&change, lexical);
            self.dumps.changed();
            (result, state.needs_compaction(), locked)
        };
        let graph_started = Instant::now();
        crate::retrieval::run_graph_work(&self.state);
        tracing::debug!(
            lock_wait_ms = (held - waited).as_secs_f64() * 1e3,
            lock_held_ms = (graph_started - held).as_secs_f64() * 1e3,
            graph_work_ms = graph_started.elapsed().as_secs_f64() * 1e3,
            "write applied"
        );
        if due {
            self.compactor.request();
        }
        result
    }

    /// The change log's seq this library has applied: every write up to it is routable here.
    pub fn library_seq(&self) -> u64 {
        self.seq.applied()
    }

    /// Waits until this replica has applied `min` (a seq a write returned, on any replica),
    /// reading the log at once rather than waiting for the follower's doorbell, at most
    /// `timeout`; UNAVAILABLE naming both seqs otherwise.
    pub fn wait_for_seq(&self, min: u64, timeout: Duration) -> Result<()> {
        if self.seq.applied() >= min {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        if self.store.is_shared() {
            if let Err(e) = self.catch_up() {
                tracing::debug!("reading the change log for min_library_seq {min}: {e}");
            }
        }
        if self.seq.wait_until(min, deadline) {
            return Ok(());
        }
        Err(LibraryError::Unavailable(format!(
            "min_library_seq: this replica has applied the library up to seq {}, the request \
             asked for {min} (waited {} ms)",
            self.seq.applied(),
            timeout.as_millis()
        )))
    }

    /// Applies every change the store's log holds past the applied seq (other replicas'
    /// writes); the applied seq after it.
    pub fn catch_up(&self) -> Result<u64> {
        let _w = self.writes.lock();
        self.catch_up_locked()
    }

    /// Where this replica stands against its store.
    pub fn replication(&self) -> ReplicationStatus {
        let f = self.follow.lock();
        let applied_seq = self.seq.applied();
        ReplicationStatus {
            store: self.store.kind(),
            shared: self.store.is_shared(),
            applied_seq,
            head_seq: f.head_seq.max(applied_seq),
            since_caught_up: f.caught_up_at.map(|t| t.elapsed()),
            last_error: f.last_error.clone(),
        }
    }

    /// Follows a shared store's change log on a thread of its own: after every notification
    /// (a doorbell only), every reconnect, and at least every `period`, it applies the log
    /// from the applied seq, so a lost notification costs latency, never a change. The
    /// thread ends once the library is dropped. Nothing to follow for an unshared store.
    pub fn follow(
        lib: &Arc<Self>,
        period: Duration,
    ) -> Result<Option<std::thread::JoinHandle<()>>> {
        if !lib.store.is_shared() {
            return Ok(None);
        }
        let store = lib.store.clone();
        let weak: Weak<Self> = Arc::downgrade(lib);
        let handle = std::thread::Builder::new()
            .name("roe-library-follower".into())
            .spawn(move || {
                let mut failures = 0u32;
                loop {
                    let waited = store.wait_for_change(period);
                    let Some(lib) = weak.upgrade() else { return };
                    let caught_up = waited.and_then(|_| lib.catch_up());
                    drop(lib);
                    match caught_up {
                        Ok(_) => failures = 0,
                        Err(e) => {
                            if failures == 0 {
                                tracing::warn!("following the library's change log: {e}; retrying");
                            }
                            failures += 1;
                            std::thread::sleep(backoff(failures));
                        }
                    }
                }
            })
            .map_err(|e| LibraryError::Storage(format!("could not start the follower: {e}")))?;
        Ok(Some(handle))
    }

    /// [`Self::catch_up`] under the write lock, which serialises every apply.
    fn catch_up_locked(&self) -> Result<u64> {
        self.catch_up_through(u64::MAX)
    }

    /// Applies the log's changes past the applied seq, up to `last`.
    fn catch_up_through(&self, last: u64) -> Result<u64> {
        const PAGE: usize = 256;
        let read = (|| -> Result<u64> {
            loop {
                let applied = self.seq.applied();
                if applied >= last {
                    return Ok(applied);
                }
                let changes = self.store.changes_since(applied, PAGE)?;
                let Some(end) = changes.last().map(|c| c.seq) else {
                    return Ok(applied);
                };
                self.follow.lock().head_seq = end;
                for c in changes.iter().filter(|c| c.seq <= last) {
                    let rows = self.store.instances_of_change(c)?;
                    self.apply_change(c, &rows)?;
                }
            }
        })();
        let mut f = self.follow.lock();
        match &read {
            Ok(_) => {
                f.caught_up_at = Some(Instant::now());
                f.last_error = None;
            }
            Err(e) => f.last_error = Some(e.to_string()),
        }
        read
    }

    /// Applies this replica's own committed write: first every earlier write (other
    /// replicas' may have committed before it), so changes apply in seq order. Should the
    /// store fail meanwhile, the write stays committed and the follower applies it later.
    fn apply_committed(&self, change: &Change, rows: &[StoredInstance]) -> Result<()> {
        if change.seq > self.seq.applied() + 1 {
            if let Err(e) = self.catch_up_through(change.seq - 1) {
                tracing::warn!(
                    seq = change.seq,
                    "a committed write waits for the change log to be readable: {e}"
                );
                return Ok(());
            }
        }
        self.apply_change(change, rows)
    }

    /// One change of the log onto the metadata, the quota counts and the routing state.
    fn apply_change(&self, change: &Change, rows: &[StoredInstance]) -> Result<()> {
        if change.seq <= self.seq.applied() {
            return Ok(());
        }
        let id = change.expert_id.as_str();
        let meta_of = |c: &Change| {
            c.meta.clone().ok_or_else(|| {
                LibraryError::Storage(format!("change {} of {id} has no metadata", c.seq))
            })
        };
        let items = vectors_of(rows);
        let added_bytes = rows.iter().map(stored_bytes).sum::<u64>();
        match change.op {
            ChangeOp::Put => {
                let meta = meta_of(change)?;
                let kind = meta.kind;
                self.usage
                    .lock()
                    .set(id, meta.weights_bytes as u64 + added_bytes);
                let had = self.metas.write().insert(id.to_string(), meta).is_some();
                self.apply(ExpertChange {
                    expert_id: id,
                    removed: had.then_some(change.removed_points.as_slice()),
                    added: Some((kind, &items)),
                })?;
            }
            ChangeOp::Append => {
                let mut meta = meta_of(change)?;
                // Counted here, in seq order: the writer's count may predate another
                // replica's append to the same expert.
                if let Some(held) = self.metas.read().get(id) {
                    meta.num_instances = held.num_instances + rows.len();
                }
                let kind = meta.kind;
                {
                    let mut usage = self.usage.lock();
                    let bytes = usage.of(id) + added_bytes;
                    usage.set(id, bytes);
                }
                self.metas.write().insert(id.to_string(), meta);
                self.apply(ExpertChange {
                    expert_id: id,
                    removed: None,
                    added: Some((kind, &items)),
                })?;
            }
            ChangeOp::Delete => {
                self.usage.lock().remove(id);
                self.metas.write().remove(id);
                self.apply(ExpertChange {
                    expert_id: id,
                    removed: Some(&change.removed_points),
                    added: None,
                })?;
            }
        }
        self.seq.advance(change.seq);
        Ok(())
    }

    /// A background compaction is asked for or running.
    pub fn compaction_running(&self) -> bool {
        self.compactor.is_busy()
    }

    /// Background compactions swapped in since the library was opened.
    pub fn background_compactions(&self) -> u64 {
        self.compactor.swapped()
    }

    /// Waits until no background compaction is asked for or running (tests and benchmarks;
    /// the service never needs to). Never returns while a [`CompactionHold`] is held by a
    /// round waiting on it.
    pub fn wait_for_compaction(&self) {
        self.compactor.wait_idle();
    }

    /// Makes background compactions stop just before their swap while the hold lives (for
    /// tests that route and write during a compaction).
    pub fn hold_compactions(&self) -> CompactionHold {
        self.compactor.hold()
    }
}

impl Drop for ExpertLibrary {
    /// Cancels a background compaction and joins its worker, then persists a changed index
    /// (see [`LibraryConfig::persist_index_on_drop`]); failures are logged: sled holds
    /// everything, so the next open rebuilds.
    fn drop(&mut self) {
        // A compaction in progress is cancelled: sled and the old index hold every write.
        self.compactor.shutdown();
        if !self.config.persist_index_on_drop || std::thread::panicking() {
            return;
        }
        if let Err(e) = self.persist_index() {
            tracing::warn!("could not persist the index on close: {e}");
        }
    }
}

/// Queries embedded between two checks that the caller still waits (one encoder batch).
const ROUTE_EMBED_CHUNK: usize = 8;

fn check_choices(choices: &[String], field: &str, l: &Limits) -> Result<()> {
    if choices.len() > l.max_choices {
        return Err(LibraryError::invalid(
            field,
            format!("{} choices, at most {}", choices.len(), l.max_choices),
        ));
    }
    if let Some((j, c)) = choices
        .iter()
        .enumerate()
        .find(|(_, c)| c.len() > l.max_choice_bytes)
    {
        return Err(LibraryError::ResourceExhausted(format!(
            "{field}[{j}] is {} bytes, at most {}",
            c.len(),
            l.max_choice_bytes
        )));
    }
    Ok(())
}

fn check_text(text: &str, field: &str, l: &Limits) -> Result<()> {
    if text.trim().is_empty() {
        return Err(LibraryError::invalid(field, "is empty"));
    }
    if text.len() > l.max_text_bytes {
        return Err(LibraryError::ResourceExhausted(format!(
            "{field} is {} bytes, at most {}",
            text.len(),
            l.max_text_bytes
        )));
    }
    Ok(())
}

fn vectors_of(rows: &[StoredInstance]) -> Vec<InstanceVectors<'_>> {
    rows.iter()
        .map(|r| InstanceVectors {
            point_id: r.point_id,
            input: &r.instance.input,
            choices: &r.instance.choices,
            target: r.instance.target.as_deref(),
            has_choices: r.choice_embedding.is_some(),
            instance: &r.embedding,
            choice_instance: r.choice_embedding.as_deref().unwrap_or(&r.embedding),
        })
        .collect()
}

/// `merged from a, b, c (weights 0.5, 0.3, 0.2)`; a concatenation has no weights.
fn merge_description(sources: &[String], weights: &[f64]) -> String {
    let from = sources.join(", ");
    if weights.is_empty() {
        return format!("merged from {from} (prompts concatenated)");
    }
    let w: Vec<String> = weights
        .iter()
        .map(|w| {
            let s = format!("{w:.4}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        })
        .collect();
    format!("merged from {from} (weights {})", w.join(", "))
}

/// What a write expects of the expert (as this replica sees it), and refusals the store
/// would give anyway, early: an existing id without a new version is ALREADY_EXISTS, a stated
/// version that is not the stored one ABORTED.
fn expectation(
    id: &str,
    seen: Option<&ExpertMeta>,
    new_version: bool,
    options: WriteOptions,
) -> Result<Expect> {
    match (options.expected_version, seen) {
        (Some(v), Some(m)) if m.version != v => Err(LibraryError::Aborted {
            id: id.to_string(),
            expected: v,
            actual: m.version,
        }),
        (Some(v), Some(_)) => Ok(Expect::Version(v)),
        (Some(_), None) => Err(not_found(id)),
        (None, Some(m)) if !new_version => Err(LibraryError::AlreadyExists {
            id: id.to_string(),
            version: m.version,
        }),
        (None, Some(m)) => Ok(Expect::Version(m.version)),
        (None, None) => Ok(Expect::Absent),
    }
}

/// The version a write that expects `expect` creates.
fn version_after(expect: Expect) -> u64 {
    match expect {
        Expect::Version(v) => v + 1,
        _ => 1,
    }
}

/// Whether a write failed only because another replica's write to the same expert committed
/// first, against an expectation this library derived (the caller stated none): the write is
/// tried again on the new state.
fn overtaken(e: &LibraryError, options: WriteOptions) -> bool {
    options.expected_version.is_none()
        && matches!(
            e,
            LibraryError::Aborted { .. } | LibraryError::AlreadyExists { .. }
        )
}

fn not_found(id: &str) -> LibraryError {
    LibraryError::NotFound {
        what: "expert",
        id: id.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
