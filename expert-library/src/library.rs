//! The expert library: the facade the services call. It owns the durable store, the encoder
//! and the routing state, and keeps them consistent: a write is embedded first, committed and
//! flushed to sled, and only then made visible to routing.
//!
//! Nothing slow happens on the request path: compacting an index (minutes of HNSW rebuild at
//! a million vectors) and dumping it afterwards run on the library's background worker
//! ([`crate::compaction`]), so Route and writes keep going meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::compaction::{CompactionContext, CompactionHold, Compactor};
use crate::embedding::Encoder;
use crate::error::{LibraryError, Result};
use crate::expert::{
    validate_expert_id, BackboneSpec, ExpertMeta, Instance, PeftAdapter, TextFormat, TrainingRecord,
};
use crate::index::IndexConfig;
use crate::merge::{merge_adapters, normalise_weights, MergeRequest, MAX_MERGE_SOURCES};
use crate::persist::{Dumps, IndexLoad, PersistReport, RebuildReason, StoredVectors};
use crate::retrieval::{
    ExpertChange, InstanceVectors, Query, RouteOptions, RouteResult, RoutingState,
};
use crate::route_cache::{RouteCache, RouteCacheStats};
use crate::store::{CompactReport, ExpertStore, StoredInstance};

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
    /// [`ExpertStore::compact_if_worthwhile`]) when more than half of its files is garbage
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

pub struct ExpertLibrary {
    store: ExpertStore,
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
            0 => (ExpertStore::open(&dir)?, None),
            min => ExpertStore::open_compacting(&dir, min)?,
        };
        store.check_encoder(encoder.id())?;
        let dim = encoder.dim();
        let mut by_expert: HashMap<String, Vec<StoredInstance>> = HashMap::new();
        for si in store.all_instances() {
            let si = si?;
            by_expert.entry(si.expert_id.clone()).or_default().push(si);
        }
        let metas = store.list(None, usize::MAX)?;
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

    /// Writes an expert (durably, replacing an older version when `replacing`) and makes it
    /// routable: the old version's instances leave the index, the new ones enter it.
    /// Called under the write lock: the quotas are checked here, once, for every way an
    /// expert is written (registered, trained, merged).
    fn store_and_index(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        rows: &[StoredInstance],
        replacing: bool,
    ) -> Result<()> {
        let l = &self.config.limits;
        self.check_adapter_bytes(adapter.safetensors.len())?;
        if !replacing && self.store.len() >= l.max_experts {
            return Err(LibraryError::ResourceExhausted(format!(
                "experts: the library holds {}, the quota max_experts is {}",
                self.store.len(),
                l.max_experts
            )));
        }
        let bytes = meta.weights_bytes as u64 + rows.iter().map(stored_bytes).sum::<u64>();
        self.check_library_bytes(&meta.id, bytes)?;
        let replaced = self.store.put_expert(meta, adapter, rows)?;
        self.usage.lock().set(&meta.id, bytes);
        let items = vectors_of(rows);
        self.apply(ExpertChange {
            expert_id: &meta.id,
            removed: replacing.then_some(replaced.as_slice()),
            added: Some((meta.kind, &items)),
        })
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
        instances
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(n, (inst, v))| {
                Ok(StoredInstance {
                    point_id: self.store.next_point_id()?,
                    expert_id: String::new(),
                    instance: inst.clone(),
                    embedding: v,
                    choice_embedding: choice_of.remove(&n),
                })
            })
            .collect()
    }

    /// Registers an expert. With `new_version` an existing id is replaced by the next
    /// version; without it an existing id is ALREADY_EXISTS. Durable once it returns.
    pub fn register(&self, new: NewExpert, new_version: bool) -> Result<ExpertMeta> {
        self.register_trained(new, new_version, None)
    }

    /// [`Self::register`] for an expert trained inside roe: its metadata keeps `training`.
    pub fn register_trained(
        &self,
        new: NewExpert,
        new_version: bool,
        training: Option<TrainingRecord>,
    ) -> Result<ExpertMeta> {
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
        let existing = self.store.get(&new.id)?;
        if let (Some(old), false) = (&existing, new_version) {
            return Err(LibraryError::AlreadyExists {
                id: new.id,
                version: old.version,
            });
        }
        let started = Instant::now();
        let mut rows = self.embed_instances(&new.instances)?;
        for r in &mut rows {
            r.expert_id = new.id.clone();
        }
        let _w = self.writes.lock();
        let existing = self.store.get(&new.id)?;
        let version = match (&existing, new_version) {
            (Some(old), false) => {
                return Err(LibraryError::AlreadyExists {
                    id: new.id,
                    version: old.version,
                })
            }
            (Some(old), true) => old.version + 1,
            (None, _) => 1,
        };
        let meta = ExpertMeta {
            id: new.id.clone(),
            name: if new.name.is_empty() {
                new.id.clone()
            } else {
                new.name
            },
            description: new.description,
            kind: summary.peft_type().into(),
            backbone: spec.name.clone(),
            version,
            created_at_unix_ms: now_ms(),
            num_instances: rows.len(),
            weights_sha256: new.adapter.sha256_hex(),
            safetensors_sha256: new.adapter.safetensors_sha256_hex(),
            weights_bytes: new.adapter.safetensors.len(),
            adapter: summary,
            training,
        };
        self.store_and_index(&meta, &new.adapter, &rows, existing.is_some())?;
        tracing::info!(
            id = %meta.id,
            version = meta.version,
            kind = meta.kind.as_str(),
            instances = meta.num_instances,
            ms = started.elapsed().as_millis() as u64,
            "expert registered"
        );
        Ok(meta)
    }

    /// Merges experts of one kind into a new expert `req.id` (see [`crate::merge`] for the
    /// math and the weights) and registers it with the union of the sources' instances
    /// (identical instances once), reusing their stored embeddings. Atomic and durable like
    /// [`Self::register`]; an existing id is ALREADY_EXISTS unless `req.new_version`. The
    /// union must stay within `max_instances_per_expert`.
    pub fn merge(&self, req: MergeRequest) -> Result<ExpertMeta> {
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
        let existing = self.store.get(&req.id)?;
        if let (Some(old), false) = (&existing, req.new_version) {
            return Err(LibraryError::AlreadyExists {
                id: req.id,
                version: old.version,
            });
        }
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
        for r in &mut rows {
            r.point_id = self.store.next_point_id()?;
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
            version: existing.as_ref().map_or(1, |old| old.version + 1),
            created_at_unix_ms: now_ms(),
            num_instances: rows.len(),
            weights_sha256: merged.adapter.sha256_hex(),
            safetensors_sha256: merged.adapter.safetensors_sha256_hex(),
            weights_bytes: merged.adapter.safetensors.len(),
            adapter: merged.summary,
            training: None,
        };
        self.store_and_index(&meta, &merged.adapter, &rows, existing.is_some())?;
        tracing::info!(
            id = %meta.id,
            version = meta.version,
            kind = meta.kind.as_str(),
            sources = req.sources.len(),
            instances = meta.num_instances,
            ms = started.elapsed().as_millis() as u64,
            "experts merged"
        );
        Ok(meta)
    }

    pub fn get(&self, id: &str) -> Result<ExpertMeta> {
        self.store.get(id)?.ok_or_else(|| not_found(id))
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
        // One extra row tells whether another page follows.
        let mut page = self.store.list(after, page_size + 1)?;
        let more = page.len() > page_size;
        page.truncate(page_size);
        Ok((page, more))
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Instance vectors in the routing index.
    pub fn num_vectors(&self) -> usize {
        self.state.read().num_vectors()
    }

    pub fn delete(&self, id: &str) -> Result<ExpertMeta> {
        let _w = self.writes.lock();
        let meta = self.get(id)?;
        let points = self.store.delete(id)?.ok_or_else(|| not_found(id))?;
        self.usage.lock().remove(id);
        self.apply(ExpertChange {
            expert_id: id,
            removed: Some(&points),
            added: None,
        })?;
        tracing::info!(id, "expert deleted");
        Ok(meta)
    }

    /// Adds instances to an expert; they are routable on the next request.
    pub fn add_instances(&self, id: &str, instances: Vec<Instance>) -> Result<ExpertMeta> {
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
        let mut meta = self.get(id)?;
        if meta.num_instances + rows.len() > self.config.limits.max_instances_per_expert {
            return Err(LibraryError::ResourceExhausted(format!(
                "instances: expert {id} would exceed {} instances",
                self.config.limits.max_instances_per_expert
            )));
        }
        meta.num_instances += rows.len();
        let bytes = self.usage.lock().of(id) + rows.iter().map(stored_bytes).sum::<u64>();
        self.check_library_bytes(id, bytes)?;
        self.store.append_instances(&meta, &rows)?;
        self.usage.lock().set(id, bytes);
        let items = vectors_of(&rows);
        self.apply(ExpertChange {
            expert_id: id,
            removed: None,
            added: Some((meta.kind, &items)),
        })?;
        Ok(meta)
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
