//! Durable expert store on sled. An expert is written in one transaction across three trees
//! (metadata, adapter record, instances with their embeddings) and flushed to disk before the
//! write is acknowledged, so an acknowledged expert survives a crash and a half-written one
//! never appears.
//!
//! An adapter's safetensors bytes are a file of their own in `roe-adapters/` beside sled's
//! files, written and synced before the record naming it is committed; the record holds the
//! config JSON, the file's name and its length. In sled, tens of MiB of weights were copied
//! three times over on their way in (the record, the transaction's copy, sled's cache) and
//! their blob files stayed on disk after a delete until a compaction; a file costs no copy
//! and is removed as soon as the record that named it is gone. File names are never reused
//! (they come from the point id generator), so a reader never sees a half-replaced file. A
//! crash can leave a file no record names (written but never committed, or its record
//! deleted before the file was): opening removes those. Records written before files were
//! used hold the bytes inline; they are read as they are and become files when replaced.
//!
//! sled 0.34 never gives disk back: deleted and replaced experts' bytes stay in its segment
//! and blob files. [`SledStore::compact_if_worthwhile`] copies the live data into a fresh
//! sled store and swaps it in, crash-safely (see "Compaction of the store" below).

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::error::{LibraryError, Result};
use crate::expert::{ExpertMeta, Instance, PeftAdapter};
use crate::library_store::{Change, ChangeOp, Expect, LibraryStore, Quota, SnapshotItem, Written};

/// One stored instance: its text, the expert it belongs to and its embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredInstance {
    pub point_id: u64,
    pub expert_id: String,
    pub instance: Instance,
    /// Embedding of the input alone (`TextFormat::Instance`).
    pub embedding: Vec<f32>,
    /// Embedding of the `choice_instance` text; `None` when the instance has no choices, so
    /// both formats share `embedding`.
    pub choice_embedding: Option<Vec<f32>>,
}

pub struct SledStore {
    db: sled::Db,
    experts: sled::Tree,
    adapters: sled::Tree,
    instances: sled::Tree,
    /// The change log ([`Change`]s under `c` + seq, big endian) and its head seq (`head`),
    /// written in each write's transaction. Only the last [`LOG_KEEP`] entries are kept: no
    /// other process follows a sled library.
    log: sled::Tree,
    /// Added to sled's id generator for point ids (see [`META_POINT_BASE`]).
    point_base: u64,
    /// Where the adapters' safetensors files are ([`ADAPTER_DIR`]).
    adapter_dir: PathBuf,
}

/// Folder of the adapter files, inside the library directory. Not one of sled's entries, so
/// a compaction of the store leaves it where it is.
pub const ADAPTER_DIR: &str = "roe-adapters";

const META_ENCODER: &[u8] = b"encoder";
/// Default-tree key: a u64 (big endian) added to every id sled's generator hands out. A
/// compacted copy is a new sled database whose generator starts again at 0, so the
/// compaction records here a base above every point id the old store ever gave out. Absent
/// (0) in a store never compacted.
const META_POINT_BASE: &[u8] = b"point_id_base";

const TREE_EXPERTS: &str = "experts";
const TREE_ADAPTERS: &str = "adapters";
const TREE_INSTANCES: &str = "instances";
const TREE_LOG: &str = "change_log";
const LOG_HEAD: &[u8] = b"head";
const LOG_ENTRY: u8 = b'c';
/// Change log entries a sled store keeps.
pub const LOG_KEEP: u64 = 4096;

/// How long `open` waits for sled's file lock (see `open_waiting`).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// sled 0.34 reports a held lock as an `Other` I/O error with this message.
fn is_lock_contention(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn instance_key(expert_id: &str, point_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(expert_id.len() + 9);
    k.extend_from_slice(expert_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&point_id.to_be_bytes());
    k
}

fn instance_prefix(expert_id: &str) -> Vec<u8> {
    let mut k = expert_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn encode_meta(m: &ExpertMeta) -> Result<Vec<u8>> {
    serde_json::to_vec(m).map_err(|e| LibraryError::Storage(format!("encode expert: {e}")))
}

fn decode_meta(b: &[u8]) -> Result<ExpertMeta> {
    serde_json::from_slice(b).map_err(|e| LibraryError::Storage(format!("decode expert: {e}")))
}

/// First bytes of an adapter record that names a file. An inline record starts with the
/// config's length instead, which these bytes would make about 1.2 GB: far above any config
/// accepted.
const FILE_RECORD: &[u8; 4] = b"ROEF";

/// What the adapters tree holds for an expert.
#[derive(Debug, Clone, PartialEq)]
enum AdapterRecord {
    /// `FILE_RECORD`, u32 length of the config JSON, the JSON, u64 length of the file, then
    /// the file's name.
    File {
        config_json: String,
        file: String,
        bytes: u64,
    },
    /// Written before adapters became files: u32 length of the config JSON, the JSON, then
    /// the safetensors bytes.
    Inline(PeftAdapter),
}

fn encode_file_record(config_json: &str, file: &str, bytes: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + config_json.len() + file.len());
    out.extend_from_slice(FILE_RECORD);
    out.extend_from_slice(&(config_json.len() as u32).to_le_bytes());
    out.extend_from_slice(config_json.as_bytes());
    out.extend_from_slice(&bytes.to_le_bytes());
    out.extend_from_slice(file.as_bytes());
    out
}

fn decode_adapter_record(b: &[u8]) -> Result<AdapterRecord> {
    let bad = || LibraryError::Storage("corrupt adapter record".into());
    let u32_at = |at: usize| -> Result<usize> {
        let v: [u8; 4] = b
            .get(at..at + 4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        Ok(u32::from_le_bytes(v) as usize)
    };
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| bad());
    if b.starts_with(FILE_RECORD) {
        let n = u32_at(4)?;
        let json = b.get(8..8 + n).ok_or_else(bad)?;
        let len: [u8; 8] = b
            .get(8 + n..16 + n)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let file = text(&b[16 + n..])?;
        if !is_adapter_file_name(&file) {
            return Err(bad());
        }
        return Ok(AdapterRecord::File {
            config_json: text(json)?,
            file,
            bytes: u64::from_le_bytes(len),
        });
    }
    let n = u32_at(0)?;
    let json = b.get(4..4 + n).ok_or_else(bad)?;
    Ok(AdapterRecord::Inline(PeftAdapter {
        config_json: text(json)?,
        safetensors: b[4 + n..].to_vec(),
    }))
}

/// The file an adapter record names, if it names one.
fn record_file(b: &[u8]) -> Result<Option<String>> {
    if !b.starts_with(FILE_RECORD) {
        return Ok(None);
    }
    match decode_adapter_record(b)? {
        AdapterRecord::File { file, .. } => Ok(Some(file)),
        AdapterRecord::Inline(_) => Ok(None),
    }
}

/// Names of adapter files: 16 hex digits and `.safetensors` (nothing a record could turn
/// into a path outside the folder).
fn is_adapter_file_name(name: &str) -> bool {
    name.strip_suffix(".safetensors")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Instance record: u64 point id, u32 dim, the instance vector, u8 flag and the
/// choice_instance vector if present, then the instance as JSON (readable, evolvable).
fn encode_instance(si: &StoredInstance) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(&(&si.expert_id, &si.instance))
        .map_err(|e| LibraryError::Storage(format!("encode instance: {e}")))?;
    let dim = si.embedding.len();
    let mut out = Vec::with_capacity(13 + dim * 8 + json.len());
    out.extend_from_slice(&si.point_id.to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    si.embedding
        .iter()
        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    match &si.choice_embedding {
        Some(v) if v.len() == dim => {
            out.push(1);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        _ => out.push(0),
    }
    out.extend_from_slice(&json);
    Ok(out)
}

fn decode_instance(b: &[u8]) -> Result<StoredInstance> {
    let bad = || LibraryError::Storage("corrupt instance record".into());
    let take = |from: usize, n: usize| b.get(from..from + n).ok_or_else(bad);
    let floats = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let point_id = u64::from_le_bytes(take(0, 8)?.try_into().map_err(|_| bad())?);
    let dim = u32::from_le_bytes(take(8, 4)?.try_into().map_err(|_| bad())?) as usize;
    let embedding = floats(take(12, dim * 4)?);
    let mut at = 12 + dim * 4;
    let choice_embedding = match take(at, 1)?[0] {
        1 => {
            let v = floats(take(at + 1, dim * 4)?);
            at += dim * 4;
            Some(v)
        }
        _ => None,
    };
    at += 1;
    let (expert_id, instance): (String, Instance) = serde_json::from_slice(&b[at..])
        .map_err(|e| LibraryError::Storage(format!("decode instance: {e}")))?;
    Ok(StoredInstance {
        point_id,
        expert_id,
        instance,
        embedding,
        choice_embedding,
    })
}

fn tx_err(e: TransactionError<LibraryError>) -> LibraryError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

impl SledStore {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    /// Opens the store, waiting up to `wait` for sled's file lock. sled 0.34 releases the lock
    /// from a background thread a moment after the last handle drops (spacejam/sled#1234), so
    /// reopening a store this process (or a process that just exited) closed can briefly find
    /// it locked. A store another live process holds stays locked: that fails after `wait`.
    ///
    /// It first finishes or undoes a compaction a crash interrupted ([`recover`]), holding
    /// the compaction lock so that it never races a compaction in another process.
    pub fn open_waiting(path: impl AsRef<Path>, wait: Duration) -> Result<Self> {
        let path = path.as_ref();
        fs::create_dir_all(path).map_err(|e| LibraryError::io(path, e))?;
        let lock = CompactionLock::acquire(path, wait)?;
        if let Some(done) = recover(path, &mut Steps::default())? {
            tracing::warn!("store in {}: {done}", path.display());
        }
        let db = open_db(path, wait)?;
        drop(lock);
        Self::with_db(db, path)
    }

    /// Over the store just opened in `dir` (sled's lock held: nothing else writes there).
    fn with_db(db: sled::Db, dir: &Path) -> Result<Self> {
        let point_base = match db.get(META_POINT_BASE)? {
            None => 0,
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                LibraryError::Storage(format!("corrupt point id base ({} bytes)", v.len()))
            })?),
        };
        let adapter_dir = dir.join(ADAPTER_DIR);
        fs::create_dir_all(&adapter_dir).map_err(|e| LibraryError::io(&adapter_dir, e))?;
        let store = Self {
            experts: db.open_tree(TREE_EXPERTS)?,
            adapters: db.open_tree(TREE_ADAPTERS)?,
            instances: db.open_tree(TREE_INSTANCES)?,
            log: db.open_tree(TREE_LOG)?,
            db,
            point_base,
            adapter_dir,
        };
        store.remove_unnamed_adapter_files()?;
        Ok(store)
    }

    /// Removes the adapter files no record names (left by a crash between writing a file and
    /// committing its record, or between deleting a record and its file), and says which
    /// named files are missing (a store damaged by hand: reading those experts fails).
    fn remove_unnamed_adapter_files(&self) -> Result<()> {
        let mut named = HashSet::new();
        for kv in self.adapters.iter() {
            let (id, v) = kv?;
            if let Some(file) = record_file(&v)? {
                named.insert(file);
            } else if v.starts_with(FILE_RECORD) {
                tracing::error!(expert = %String::from_utf8_lossy(&id), "corrupt adapter record");
            }
        }
        let dir = &self.adapter_dir;
        let mut present = HashSet::new();
        let mut removed = 0usize;
        for e in fs::read_dir(dir).map_err(|e| LibraryError::io(dir, e))? {
            let e = e.map_err(|e| LibraryError::io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if named.contains(&name) {
                present.insert(name);
                continue;
            }
            match fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), %err, "could not remove an unnamed adapter file")
                }
            }
        }
        if removed > 0 {
            sync_dir(dir)?;
            tracing::info!(removed, "adapter files no record names were removed");
        }
        for missing in named.difference(&present) {
            tracing::error!(file = %dir.join(missing).display(), "an expert's adapter file is missing");
        }
        Ok(())
    }

    /// Writes `safetensors` as a new adapter file, synced (the folder too), and returns its
    /// name. A failure (a full disk) leaves no file behind.
    fn write_adapter_file(&self, safetensors: &[u8]) -> Result<String> {
        let id = self
            .next_point_ids(1)?
            .pop()
            .ok_or_else(|| LibraryError::Storage("no point id for an adapter file name".into()))?;
        let name = format!("{id:016x}.safetensors");
        let path = self.adapter_dir.join(&name);
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create_new(&path)?;
            f.write_all(safetensors)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&path);
            return Err(LibraryError::io(&path, e));
        }
        sync_dir(&self.adapter_dir)?;
        Ok(name)
    }

    /// Removes an adapter file whose record is gone (best effort: the next open removes it
    /// otherwise).
    fn remove_adapter_file(&self, name: &str) {
        let path = self.adapter_dir.join(name);
        if let Err(err) = fs::remove_file(&path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), %err, "could not remove an adapter file; the next open will");
            }
        }
    }

    fn adapter_file_of(&self, id: &str) -> Result<Option<String>> {
        match self.adapters.get(id.as_bytes())? {
            Some(v) => record_file(&v),
            None => Ok(None),
        }
    }
}

impl SledStore {
    fn head(log: &impl LogReader) -> Result<u64> {
        log.read(LOG_HEAD)?
            .map_or(Ok(0), |v| decode_u64(&v, "change log head"))
    }

    fn list_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>> {
        let start = log_key(seq.saturating_add(1));
        self.log
            .range(start..=log_key(u64::MAX))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                if k.first() != Some(&LOG_ENTRY) {
                    return Err(LibraryError::Storage("corrupt change log key".into()));
                }
                Ok(decode_entry(&v)?.change)
            })
            .collect()
    }

    /// Drops the log entry that fell out of the kept window with `seq`.
    fn trim_log(&self, seq: u64) {
        if seq > LOG_KEEP {
            if let Err(e) = self.log.remove(log_key(seq - LOG_KEEP)) {
                tracing::warn!("trimming the change log: {e}");
            }
        }
    }
}

/// Reads inside and outside a sled transaction alike.
trait LogReader {
    fn read(&self, key: &[u8]) -> Result<Option<sled::IVec>>;
}

impl LogReader for sled::Tree {
    fn read(&self, key: &[u8]) -> Result<Option<sled::IVec>> {
        Ok(self.get(key)?)
    }
}

/// A sled log entry: the change and the point ids it added (sled keeps no seq per
/// instance).
#[derive(Serialize, Deserialize)]
struct LogEntry {
    change: Change,
    added_points: Vec<u64>,
}

fn decode_entry(v: &[u8]) -> Result<LogEntry> {
    serde_json::from_slice(v)
        .map_err(|e| LibraryError::Storage(format!("corrupt change log entry: {e}")))
}

fn log_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(LOG_ENTRY);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn decode_u64(v: &[u8], what: &str) -> Result<u64> {
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| {
        LibraryError::Storage(format!("corrupt {what} ({} bytes)", v.len()))
    })?))
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<LibraryError>>;

fn tx_abort<T>(e: LibraryError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Appends `change` (its seq the head's next) inside a transaction; returns the seq.
fn tx_append_log(
    log: &sled::transaction::TransactionalTree,
    mut change: Change,
    added_points: &[u64],
) -> TxResult<u64> {
    let head = match log.get(LOG_HEAD)? {
        None => 0,
        Some(v) => match decode_u64(&v, "change log head") {
            Ok(h) => h,
            Err(e) => return tx_abort(e),
        },
    };
    change.seq = head + 1;
    let entry = LogEntry {
        change,
        added_points: added_points.to_vec(),
    };
    let seq = entry.change.seq;
    let bytes = match serde_json::to_vec(&entry) {
        Ok(b) => b,
        Err(e) => return tx_abort(LibraryError::Storage(format!("encoding a change: {e}"))),
    };
    log.insert(log_key(seq), bytes)?;
    log.insert(LOG_HEAD, &seq.to_be_bytes())?;
    Ok(seq)
}

fn tx_meta(
    experts: &sled::transaction::TransactionalTree,
    id: &str,
) -> TxResult<Option<ExpertMeta>> {
    match experts.get(id.as_bytes())? {
        None => Ok(None),
        Some(v) => match decode_meta(&v) {
            Ok(m) => Ok(Some(m)),
            Err(e) => tx_abort(e),
        },
    }
}

impl LibraryStore for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    /// Vectors from another encoder would route nonsense.
    fn check_encoder(&self, encoder_id: &str) -> Result<()> {
        match self.db.get(META_ENCODER)? {
            Some(v) if v.as_ref() != encoder_id.as_bytes() => {
                Err(LibraryError::FailedPrecondition(format!(
                    "the library was embedded with encoder {:?} but roe runs {encoder_id:?}; \
                     use a fresh data directory",
                    String::from_utf8_lossy(&v)
                )))
            }
            Some(_) => Ok(()),
            None => {
                self.db.insert(META_ENCODER, encoder_id.as_bytes())?;
                self.db.flush()?;
                Ok(())
            }
        }
    }

    fn next_point_ids(&self, n: usize) -> Result<Vec<u64>> {
        (0..n)
            .map(|_| {
                self.point_base
                    .checked_add(self.db.generate_id()?)
                    .ok_or_else(|| LibraryError::Storage("point ids exhausted".into()))
            })
            .collect()
    }

    fn get(&self, id: &str) -> Result<Option<ExpertMeta>> {
        self.experts
            .get(id.as_bytes())?
            .map(|v| decode_meta(&v))
            .transpose()
    }

    fn adapter(&self, id: &str) -> Result<Option<PeftAdapter>> {
        // A new version may replace the expert (and remove its file) between reading the
        // record and the file: the record is read again then.
        for _ in 0..4 {
            let Some(record) = self.adapters.get(id.as_bytes())? else {
                return Ok(None);
            };
            let (config_json, file, bytes) = match decode_adapter_record(&record)? {
                AdapterRecord::Inline(a) => return Ok(Some(a)),
                AdapterRecord::File {
                    config_json,
                    file,
                    bytes,
                } => (config_json, file, bytes),
            };
            let path = self.adapter_dir.join(&file);
            match fs::read(&path) {
                Ok(safetensors) if safetensors.len() as u64 == bytes => {
                    return Ok(Some(PeftAdapter {
                        config_json,
                        safetensors,
                    }))
                }
                Ok(safetensors) => {
                    return Err(LibraryError::Storage(format!(
                        "adapter file {} of expert {id} holds {} bytes, its record says {bytes}",
                        path.display(),
                        safetensors.len()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if self.adapters.get(id.as_bytes())?.as_ref() == Some(&record) {
                        return Err(LibraryError::Storage(format!(
                            "adapter file {} of expert {id} is missing",
                            path.display()
                        )));
                    }
                }
                Err(e) => return Err(LibraryError::io(&path, e)),
            }
        }
        Err(LibraryError::Storage(format!(
            "expert {id} was replaced again and again while its adapter was read"
        )))
    }

    fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ExpertMeta>> {
        let iter = match after {
            Some(a) => {
                let mut start = a.as_bytes().to_vec();
                start.push(0);
                self.experts.range(start..)
            }
            None => self.experts.iter(),
        };
        iter.take(limit)
            .map(|kv| {
                let (_, v) = kv?;
                decode_meta(&v)
            })
            .collect()
    }

    fn len(&self) -> Result<usize> {
        Ok(self.experts.len())
    }

    fn instances_of(&self, id: &str) -> Result<Vec<StoredInstance>> {
        self.instances
            .scan_prefix(instance_prefix(id))
            .map(|kv| {
                let (_, v) = kv?;
                decode_instance(&v)
            })
            .collect()
    }

    /// One process owns a sled store and the library serialises its writes, so reading the
    /// trees one after the other (before any write) is a consistent snapshot.
    fn snapshot(&self, f: &mut dyn FnMut(SnapshotItem) -> Result<()>) -> Result<u64> {
        let seq = Self::head(&self.log)?;
        for kv in self.experts.iter() {
            let (_, v) = kv?;
            f(SnapshotItem::Meta(Box::new(decode_meta(&v)?)))?;
        }
        for kv in self.instances.iter() {
            let (_, v) = kv?;
            f(SnapshotItem::Instance(decode_instance(&v)?))?;
        }
        Ok(seq)
    }

    /// The adapter file is written and synced before the transaction; the transaction
    /// replaces the old version's instances, records and log entry at once; the store is
    /// flushed before it returns. Quotas are the library's to check: one process owns a
    /// sled store and serialises its writes.
    fn put_expert(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        instances: &[StoredInstance],
        expect: Expect,
        _quota: &Quota,
    ) -> Result<Written> {
        let old_keys: Vec<sled::IVec> = self
            .instances
            .scan_prefix(instance_prefix(&meta.id))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let old_points: Vec<u64> = old_keys.iter().filter_map(|k| point_of_key(k)).collect();
        let old_file = self.adapter_file_of(&meta.id)?;
        let meta_bytes = encode_meta(meta)?;
        let added: Vec<u64> = instances.iter().map(|si| si.point_id).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = instances
            .iter()
            .map(|si| Ok((instance_key(&meta.id, si.point_id), encode_instance(si)?)))
            .collect::<Result<_>>()?;
        // The file first, synced: a committed record always names a complete file.
        let file = self.write_adapter_file(&adapter.safetensors)?;
        let record = encode_file_record(
            &adapter.config_json,
            &file,
            adapter.safetensors.len() as u64,
        );
        let change = Change {
            seq: 0,
            op: ChangeOp::Put,
            expert_id: meta.id.clone(),
            version: meta.version,
            meta: Some(meta.clone()),
            removed_points: old_points.clone(),
        };
        let committed = (&self.experts, &self.adapters, &self.instances, &self.log)
            .transaction(|(experts, adapters, inst, log)| {
                if let Err(e) =
                    expect.check(&meta.id, tx_meta(experts, &meta.id)?.map(|m| m.version))
                {
                    return tx_abort(e);
                }
                for k in &old_keys {
                    inst.remove(k)?;
                }
                for (k, v) in &rows {
                    inst.insert(k.as_slice(), v.as_slice())?;
                }
                adapters.insert(meta.id.as_bytes(), record.as_slice())?;
                experts.insert(meta.id.as_bytes(), meta_bytes.as_slice())?;
                tx_append_log(log, change.clone(), &added)
            })
            .map_err(tx_err);
        let seq = match committed {
            Ok(seq) => seq,
            Err(e) => {
                // Nothing names the file: the transaction applied nothing.
                self.remove_adapter_file(&file);
                return Err(e);
            }
        };
        // Should the flush fail, the record may still reach the disk: its file stays.
        self.db.flush()?;
        if let Some(old) = old_file {
            self.remove_adapter_file(&old);
        }
        self.trim_log(seq);
        Ok(Written {
            seq,
            removed_points: old_points,
        })
    }

    fn append_instances(
        &self,
        meta: &ExpertMeta,
        instances: &[StoredInstance],
        expect: Expect,
        _quota: &Quota,
    ) -> Result<Written> {
        let meta_bytes = encode_meta(meta)?;
        let added: Vec<u64> = instances.iter().map(|si| si.point_id).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = instances
            .iter()
            .map(|si| Ok((instance_key(&meta.id, si.point_id), encode_instance(si)?)))
            .collect::<Result<_>>()?;
        let change = Change {
            seq: 0,
            op: ChangeOp::Append,
            expert_id: meta.id.clone(),
            version: meta.version,
            meta: Some(meta.clone()),
            removed_points: Vec::new(),
        };
        let expect = match expect {
            Expect::Any | Expect::Absent => Expect::Present,
            e => e,
        };
        let seq = (&self.experts, &self.instances, &self.log)
            .transaction(|(experts, inst, log)| {
                if let Err(e) =
                    expect.check(&meta.id, tx_meta(experts, &meta.id)?.map(|m| m.version))
                {
                    return tx_abort(e);
                }
                for (k, v) in &rows {
                    inst.insert(k.as_slice(), v.as_slice())?;
                }
                experts.insert(meta.id.as_bytes(), meta_bytes.as_slice())?;
                tx_append_log(log, change.clone(), &added)
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        self.trim_log(seq);
        Ok(Written {
            seq,
            removed_points: Vec::new(),
        })
    }

    fn delete(&self, id: &str, expect: Expect) -> Result<Option<Written>> {
        let Some(stored) = self.get(id)? else {
            return match expect {
                Expect::Version(_) | Expect::Present => Err(LibraryError::NotFound {
                    what: "expert",
                    id: id.to_string(),
                }),
                _ => Ok(None),
            };
        };
        let keys: Vec<sled::IVec> = self
            .instances
            .scan_prefix(instance_prefix(id))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let removed_points: Vec<u64> = keys.iter().filter_map(|k| point_of_key(k)).collect();
        let file = self.adapter_file_of(id)?;
        let change = Change {
            seq: 0,
            op: ChangeOp::Delete,
            expert_id: id.to_string(),
            version: stored.version,
            meta: None,
            removed_points: removed_points.clone(),
        };
        let expect = match expect {
            Expect::Absent => Expect::Any,
            e => e,
        };
        let seq = (&self.experts, &self.adapters, &self.instances, &self.log)
            .transaction(|(experts, adapters, inst, log)| {
                if let Err(e) = expect.check(id, tx_meta(experts, id)?.map(|m| m.version)) {
                    return tx_abort(e);
                }
                for k in &keys {
                    inst.remove(k)?;
                }
                adapters.remove(id.as_bytes())?;
                experts.remove(id.as_bytes())?;
                tx_append_log(log, change.clone(), &[])
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        if let Some(file) = file {
            self.remove_adapter_file(&file);
        }
        self.trim_log(seq);
        Ok(Some(Written {
            seq,
            removed_points,
        }))
    }

    fn head_seq(&self) -> Result<u64> {
        Self::head(&self.log)
    }

    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>> {
        let head = self.head_seq()?;
        if seq < head && self.log.get(log_key(seq + 1))?.is_none() {
            return Err(LibraryError::FailedPrecondition(format!(
                "the sled change log no longer holds seq {} (it keeps the last {LOG_KEEP})",
                seq + 1
            )));
        }
        self.list_since(seq, limit)
    }

    fn instances_of_change(&self, change: &Change) -> Result<Vec<StoredInstance>> {
        let Some(entry) = self.log.get(log_key(change.seq))? else {
            return Err(LibraryError::FailedPrecondition(format!(
                "the sled change log no longer holds seq {}",
                change.seq
            )));
        };
        let added = decode_entry(&entry)?.added_points;
        let mut rows = Vec::with_capacity(added.len());
        for p in added {
            if let Some(v) = self.instances.get(instance_key(&change.expert_id, p))? {
                rows.push(decode_instance(&v)?);
            }
        }
        Ok(rows)
    }
}

fn point_of_key(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Opens the sled database in `path`, waiting up to `wait` for its lock (see
/// [`SledStore::open_waiting`]).
fn open_db(path: &Path, wait: Duration) -> Result<sled::Db> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_contention(&e) && started.elapsed() < wait => {
                std::thread::sleep(pause.min(wait.saturating_sub(started.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) if is_lock_contention(&e) => {
                return Err(LibraryError::Storage(format!(
                    "open {}: the store is held by another open library or process (waited {:.1} s): {e}",
                    path.display(),
                    started.elapsed().as_secs_f64()
                )))
            }
            Err(e) => {
                return Err(LibraryError::Storage(format!(
                    "open {}: {e}",
                    path.display()
                )))
            }
        }
    }
}

// ---- Compaction of the store ----------------------------------------------------------------
//
// sled keeps its files in the library directory itself (`conf`, `db`, `blobs/`, `snap.*`),
// next to the index dump (`roe-index/`) and whatever else the library keeps there, so the
// store cannot be swapped by renaming one directory: its entries move one by one, and
// directory names mark how far the swap got. A compaction, with every name in the library
// directory D:
//
//   1. copies every tree (the default tree included) into a fresh sled store in
//      `D/roe-store.compacting/`, records there a point id base above every id the old
//      store gave out, flushes, closes both stores and fsyncs every file of the copy; a
//      copy no smaller than the store is thrown away here; then makes the empty
//      `D/roe-store.old.moving/` (so that nothing past the commit needs new space);
//   2. renames `roe-store.compacting` to `roe-store.compacted` and fsyncs D: the commit
//      point, after which the copy is complete and the swap only ever goes forward;
//   3. moves the old store's entries out of D into `roe-store.old.moving/` (`db` first),
//      then renames that to `D/roe-store.old` once D holds none of them;
//   4. moves the copy's entries from `roe-store.compacted/` into D (`db` last, so that a
//      `D/db` means a complete store), then removes the empty `roe-store.compacted`;
//   5. removes `roe-store.old`.
//
// Steps 3 to 5 are exactly what recovery does, so a compaction finishes by calling it, and
// each state a crash can leave recovers to exactly one complete store holding every
// acknowledged write (writes are acknowledged only by a store that is open, and no store
// is open during a compaction: the compaction lock keeps other processes that open the
// store through `SledStore` out, sled's lock keeps a library that is open out of it).
// Recovery runs under the compaction lock before every open, in this order:
//
//   - `compacting` exists (crash in step 1 or before 2): the copy may be partial and the old
//     store is untouched in D; remove the copy (and the empty `old.moving`, below).
//   - `compacted` exists, no `old` (crash just after the commit or in step 3, with or
//     without `old.moving`): the copy is complete; D holds only old entries, or none; move
//     what is left of them into `old.moving`, rename it `old`, and go on with step 4.
//   - `compacted` and `old` exist (crash in step 4): D holds only the copy's entries moved so
//     far; move the rest, then step 5.
//   - `old.moving` without `compacted` (crash between its making in step 1 and the commit):
//     it is empty; remove it. Were it not (never left by the protocol), its entries move
//     back where D lacks them.
//   - `old` without `compacted` (crash in step 5): D holds the complete copy (`D/db`);
//     remove `old`. Should D hold no `db` (a state the protocol never leaves, made by
//     hand), `old` is the only store: its entries move back into D.
// A copy that fails before the commit (a full disk) is removed and the old store opened
// unchanged. Every step is a rename within D or a removal, each followed by fsyncs of the
// directories it changed. Crash tests stop a compaction before each of these steps
// (`CompactFaults::crash_before_step`) and check the recovery.

const COMPACTING: &str = "roe-store.compacting";
const COMPACTED: &str = "roe-store.compacted";
const OLD_MOVING: &str = "roe-store.old.moving";
const OLD: &str = "roe-store.old";
/// Held while a store is recovered and opened, and through a compaction.
const LOCK_FILE: &str = "roe-store.lock";

/// Bytes per batch when copying a tree.
const COPY_BATCH_BYTES: usize = 8 << 20;

/// What a compaction of the store did.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactReport {
    /// Bytes of the store's files (sled's entries in the library directory) before.
    pub disk_bytes_before: u64,
    /// Bytes of keys and values over every tree: what the copy holds.
    pub live_bytes: u64,
    /// Bytes of the store's files after.
    pub disk_bytes_after: u64,
    pub seconds: f64,
}

/// Faults injected into a compaction, for tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CompactFaults {
    /// The copy fails, as on a full disk, once it copied more than this many bytes.
    pub fail_copy_after_bytes: Option<u64>,
    /// The compaction stops dead before its nth (from 0) step that changes files, leaving
    /// them as a crash there would (the error says "simulated crash").
    pub crash_before_step: Option<usize>,
}

/// Counts the steps that change files, to stop before one (tests).
#[derive(Default)]
struct Steps {
    crash_before: Option<usize>,
    done: usize,
}

impl Steps {
    fn step(&mut self, what: &str) -> Result<()> {
        if self.crash_before == Some(self.done) {
            return Err(LibraryError::Storage(format!(
                "simulated crash before step {} ({what})",
                self.done
            )));
        }
        self.done += 1;
        Ok(())
    }
}

fn is_simulated_crash(e: &LibraryError) -> bool {
    matches!(e, LibraryError::Storage(m) if m.starts_with("simulated crash"))
}

/// An exclusive lock on `D/roe-store.lock` (flock on Linux; released when dropped).
struct CompactionLock {
    _file: fs::File,
}

impl CompactionLock {
    fn acquire(dir: &Path, wait: Duration) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LibraryError::io(&path, e))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(LibraryError::Storage(format!(
                        "open {}: the store is being opened or compacted by another library or \
                         process (waited {:.1} s for {})",
                        dir.display(),
                        started.elapsed().as_secs_f64(),
                        path.display()
                    )))
                }
                Err(fs::TryLockError::Error(e)) => return Err(LibraryError::io(&path, e)),
            }
        }
    }
}

/// Waits until no sled handle holds the store in `dir` (its lock on `dir/db` is gone):
/// sled releases it from a background thread a moment after the last handle drops.
fn wait_until_closed(dir: &Path, wait: Duration) -> Result<()> {
    let path = dir.join("db");
    let file = fs::File::open(&path).map_err(|e| LibraryError::io(&path, e))?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LibraryError::Storage(format!(
                    "{} still open after {:.1} s",
                    path.display(),
                    started.elapsed().as_secs_f64()
                )))
            }
            Err(fs::TryLockError::Error(e)) => return Err(LibraryError::io(&path, e)),
        }
    }
}

/// Whether a directory entry is one of sled's (everything else in the library directory,
/// the index dump included, is not the store's).
fn is_store_entry(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// sled's entries in `dir`, `db` first or last.
fn store_entries(dir: &Path, db_first: bool) -> Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| LibraryError::io(dir, e))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| LibraryError::io(dir, e))
        })
        .collect::<Result<Vec<_>>>()?;
    names.retain(|n| is_store_entry(n));
    names.sort_by_key(|n| (n == "db") != db_first);
    Ok(names)
}

/// Bytes of the files under `path` (itself, when a file).
fn bytes_under(path: &Path) -> Result<u64> {
    let m = fs::symlink_metadata(path).map_err(|e| LibraryError::io(path, e))?;
    if !m.is_dir() {
        return Ok(m.len());
    }
    let mut total = 0;
    for e in fs::read_dir(path).map_err(|e| LibraryError::io(path, e))? {
        match bytes_under(&e.map_err(|e| LibraryError::io(path, e))?.path()) {
            Ok(bytes) => total += bytes,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Bytes of the store's files in `dir`: sled's entries only.
pub fn store_disk_bytes(dir: impl AsRef<Path>) -> Result<u64> {
    let dir = dir.as_ref();
    let mut total = 0;
    for name in store_entries(dir, true)? {
        total += bytes_under(&dir.join(name))?;
    }
    Ok(total)
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| LibraryError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// fsyncs every file and directory under `path`.
fn sync_tree(path: &Path) -> Result<()> {
    let m = fs::symlink_metadata(path).map_err(|e| LibraryError::io(path, e))?;
    if m.is_dir() {
        for e in fs::read_dir(path).map_err(|e| LibraryError::io(path, e))? {
            match sync_tree(&e.map_err(|e| LibraryError::io(path, e))?.path()) {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
        }
        sync_dir(path)
    } else if m.is_file() {
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| LibraryError::io(path, e))
    } else {
        Ok(())
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| {
        LibraryError::Storage(format!(
            "rename {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

fn remove_dir_all(path: &Path) -> Result<()> {
    fs::remove_dir_all(path).map_err(|e| LibraryError::io(path, e))
}

/// Moves `src`'s store entries back into `dir`, which must lack them, then removes `src`.
fn move_back(src: &Path, dir: &Path, steps: &mut Steps) -> Result<()> {
    for name in store_entries(src, false)? {
        let to = dir.join(&name);
        if to.exists() {
            return Err(LibraryError::Storage(format!(
                "cannot restore the store from {}: {} exists too; move one of them away by hand",
                src.display(),
                to.display()
            )));
        }
        steps.step("move an entry back")?;
        rename(&src.join(&name), &to)?;
    }
    sync_dir(dir)?;
    steps.step("remove the emptied directory")?;
    remove_dir_all(src)?;
    sync_dir(dir)
}

/// Brings the store in `dir` back to one complete store after a compaction a crash
/// interrupted (see the states above); says what it did, `None` when there was nothing to
/// do. Called with the compaction lock held and no store open.
fn recover(dir: &Path, steps: &mut Steps) -> Result<Option<&'static str>> {
    let (compacting, compacted) = (dir.join(COMPACTING), dir.join(COMPACTED));
    let (moving, old) = (dir.join(OLD_MOVING), dir.join(OLD));
    let mut done = None;
    if compacting.exists() {
        steps.step("remove an unfinished copy")?;
        remove_dir_all(&compacting)?;
        sync_dir(dir)?;
        done = Some("removed an unfinished compacted copy; the store is as it was");
    }
    if compacted.exists() {
        if !old.exists() {
            if !moving.exists() {
                steps.step("make the directory for the old store")?;
                fs::create_dir(&moving).map_err(|e| LibraryError::io(&moving, e))?;
                sync_dir(dir)?;
            }
            for name in store_entries(dir, true)? {
                steps.step("move an old entry out")?;
                rename(&dir.join(&name), &moving.join(&name))?;
            }
            sync_dir(&moving)?;
            sync_dir(dir)?;
            steps.step("mark the old store moved out")?;
            rename(&moving, &old)?;
            sync_dir(dir)?;
        }
        for name in store_entries(&compacted, false)? {
            steps.step("move a new entry in")?;
            rename(&compacted.join(&name), &dir.join(&name))?;
        }
        sync_dir(dir)?;
        steps.step("remove the emptied copy directory")?;
        remove_dir_all(&compacted)?;
        sync_dir(dir)?;
        done = Some("swapped in a compacted copy");
    } else if moving.exists() {
        // Made just before the commit, so normally empty: the commit never happened.
        move_back(&moving, dir, steps)?;
        done = done.or(Some("moved a partly moved old store back"));
    }
    if old.exists() {
        if dir.join("db").exists() {
            steps.step("remove the old store")?;
            remove_dir_all(&old)?;
            sync_dir(dir)?;
            done = done.or(Some("removed the old store a compaction left"));
        } else {
            move_back(&old, dir, steps)?;
            done = Some("the store was missing: restored the old store");
        }
    }
    Ok(done)
}

/// Keys and values over every tree, the default tree included.
fn live_bytes(db: &sled::Db) -> Result<u64> {
    let mut total = 0;
    for name in db.tree_names() {
        for kv in db.open_tree(&name)?.iter() {
            let (k, v) = kv?;
            total += (k.len() + v.len()) as u64;
        }
    }
    Ok(total)
}

/// A lower bound of [`live_bytes`] from the default and experts trees alone (a record per
/// expert): the adapters and instances the experts' metadata counts, at their smallest.
fn live_bytes_lower_bound(db: &sled::Db) -> Result<u64> {
    let mut total = 0;
    for kv in db.iter() {
        let (k, v) = kv?;
        total += (k.len() + v.len()) as u64;
    }
    let instances = db.open_tree(TREE_INSTANCES)?;
    let adapters = db.open_tree(TREE_ADAPTERS)?;
    let dim = match instances.iter().next().transpose()? {
        Some((_, v)) if v.len() >= 12 => u32::from_le_bytes([v[8], v[9], v[10], v[11]]) as u64,
        _ => 0,
    };
    for kv in db.open_tree(TREE_EXPERTS)?.iter() {
        let (k, v) = kv?;
        total += (k.len() + v.len()) as u64;
        if let Ok(meta) = decode_meta(&v) {
            let id = k.len() as u64;
            // Weights in a file are not the store's; only an inline record holds them.
            let inline = match adapters.get(&k)? {
                Some(a) if !a.starts_with(FILE_RECORD) => meta.weights_bytes as u64,
                _ => 0,
            };
            total += id + 4 + inline;
            total += meta.num_instances as u64 * (id + 9 + 13 + 4 * dim);
        }
    }
    Ok(total)
}

/// Whether compacting a store of `disk` bytes of files holding `live` bytes pays off: when
/// more than half of the files is garbage and the garbage is more than `min_waste_bytes`.
/// "Garbage" is what a compaction gives back: the files less what a fresh copy takes, which
/// is `live` times `ratio`, the copy-to-live ratio the last compaction measured (1 when none
/// did). With many small records a fresh sled copy takes twice to three times its live
/// bytes (log-structured node rewrites), so without that ratio such a store would be copied
/// at every open for nothing.
fn worthwhile(disk: u64, live: u64, min_waste_bytes: u64, ratio: f64) -> bool {
    let fresh = (live as f64 * ratio.max(1.0)) as u64;
    disk.saturating_sub(fresh) > min_waste_bytes.max(fresh)
}

/// Where the copy-to-live ratio of the last compaction is kept: a hint, not part of the
/// store (missing or unreadable, it counts as 1).
const RATIO_FILE: &str = "roe-store.copy-ratio";

fn read_ratio(dir: &Path) -> f64 {
    fs::read_to_string(dir.join(RATIO_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|r| r.is_finite())
        .map_or(1.0, |r| r.clamp(1.0, 4.0))
}

/// Bytes of a fresh copy that do not grow with the data: sled's first segments, and the
/// scratch log of [`release_superseded_blobs`] when it ran.
fn fixed_copy_bytes(scratch: bool) -> u64 {
    if scratch {
        4 << 20
    } else {
        1 << 20
    }
}

/// Records the ratio of a fresh copy's bytes (less the fixed ones) to the live bytes it
/// holds (best effort: a hint), when there are enough live bytes to measure it.
fn write_ratio(dir: &Path, copy: u64, scratch: bool, live: u64) {
    if live < 1 << 20 {
        return;
    }
    let grown = copy.saturating_sub(fixed_copy_bytes(scratch));
    let ratio = (grown as f64 / live as f64).clamp(1.0, 4.0);
    let (tmp, path) = (dir.join(format!("{RATIO_FILE}.tmp")), dir.join(RATIO_FILE));
    if let Err(e) = fs::write(&tmp, format!("{ratio:.4}\n")).and_then(|()| fs::rename(&tmp, &path))
    {
        tracing::warn!(
            "could not record the store's copy ratio in {}: {e}",
            path.display()
        );
    }
}

/// Values from this size on may be blob files in sled (its threshold is a quarter of a
/// 512 KiB segment, less headers; this is well below it).
const BLOB_SIZED: usize = 64 << 10;

/// What [`copy_trees`] copied.
struct Copied {
    /// Bytes of keys and values.
    bytes: u64,
    /// Values of [`BLOB_SIZED`] or more.
    blob_sized: usize,
    /// Bytes of those values.
    blob_bytes: u64,
}

/// Copies every tree of `old` into `new`.
fn copy_trees(
    old: &sled::Db,
    new: &sled::Db,
    faults: &CompactFaults,
    steps: &mut Steps,
) -> Result<Copied> {
    let (mut copied, mut blob_sized, mut blob_bytes) = (0u64, 0usize, 0u64);
    for name in old.tree_names() {
        let (src, dst) = (old.open_tree(&name)?, new.open_tree(&name)?);
        let (mut batch, mut pending) = (sled::Batch::default(), 0usize);
        for kv in src.iter() {
            let (k, v) = kv?;
            copied += (k.len() + v.len()) as u64;
            if v.len() >= BLOB_SIZED {
                blob_sized += 1;
                blob_bytes += v.len() as u64;
            }
            if faults.fail_copy_after_bytes.is_some_and(|n| copied > n) {
                return Err(LibraryError::Storage(
                    "No space left on device (os error 28) (simulated)".into(),
                ));
            }
            pending += k.len() + v.len();
            batch.insert(k, v);
            if pending >= COPY_BATCH_BYTES {
                dst.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        dst.apply_batch(batch)?;
        steps.step("copy the next tree")?;
    }
    Ok(Copied {
        bytes: copied,
        blob_sized,
        blob_bytes,
    })
}

/// Makes sled delete the blob files the copy itself superseded. Values over sled's blob
/// threshold (a quarter of a 512 KiB segment: adapters) are files in `blobs/`; a tree leaf
/// holds up to 16 of them, and every insert writes a delta blob which the leaf's next
/// consolidation (a blob of all its values) supersedes. sled deletes superseded blobs only
/// when the log segment that recorded the replacement is retired, which needs the stable
/// log to be two segments past it: a fresh copy of many adapters, all of it in the first
/// segments, would keep about twice its live bytes. So the copy writes (and drops) a
/// scratch tree of small values once the trees are copied, 256 KiB at a time until the blob
/// files are down to about the blob-sized values copied (`blob_bytes`), at most 4 MiB. It
/// costs the copy's `db` file a few MiB (free segments sled reuses for later writes).
fn release_superseded_blobs(db: &sled::Db, dir: &Path, blob_bytes: u64) -> Result<()> {
    const SCRATCH: &[u8] = b"__roe_compaction_scratch";
    // Small values: 16 to a leaf stays under the blob threshold, so the scratch writes go to
    // the log and sled's segment cleaner reclaims them.
    const VALUE: usize = 4 << 10;
    const ROUND_BYTES: usize = 256 << 10;
    const MAX_ROUNDS: u32 = 16;
    // The live blob-sized values and a little for the headers and small values that share
    // their leaves.
    let target = blob_bytes + blob_bytes / 20 + (1 << 20);
    let blobs = dir.join("blobs");
    let scratch = db.open_tree(SCRATCH)?;
    let value = vec![0u8; VALUE];
    let per_round = (ROUND_BYTES / VALUE) as u32;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS {
        for i in 0..per_round {
            scratch.insert((rounds * per_round + i).to_be_bytes(), value.as_slice())?;
        }
        db.flush()?;
        rounds += 1;
        if bytes_under(&blobs)? <= target {
            break;
        }
    }
    tracing::debug!(
        rounds,
        blob_bytes,
        blob_files_bytes = bytes_under(&blobs)?,
        "scratch log written to retire superseded blobs"
    );
    drop(scratch);
    db.drop_tree(SCRATCH)?;
    db.flush()?;
    Ok(())
}

/// Step 1 of a compaction: the copy in `D/roe-store.compacting/`, complete, synced, both
/// stores closed; returns the bytes of its files and whether it wrote the scratch log.
fn write_copy(
    dir: &Path,
    old: sled::Db,
    live: u64,
    faults: &CompactFaults,
    steps: &mut Steps,
) -> Result<(u64, bool)> {
    let target = dir.join(COMPACTING);
    let new = sled::Config::new().path(&target).open()?;
    let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        copy_trees(&old, &new, faults, steps)
    }))
    .map_err(|_| LibraryError::Storage("sled panicked while copying".into()))??;
    if copied.bytes != live {
        return Err(LibraryError::Storage(format!(
            "the copy holds {} bytes of keys and values, the store {live}",
            copied.bytes
        )));
    }
    // Point ids of the copy start above every id the old store handed out: sled's
    // generator does not travel with the trees (it starts at 0 in the new store), and
    // `generate_id` now returns more than any id it returned before, across restarts.
    let base = match old.get(META_POINT_BASE)? {
        Some(v) => u64::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| LibraryError::Storage("corrupt point id base".into()))?,
        ),
        None => 0,
    };
    let next = base
        .checked_add(old.generate_id()?)
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| LibraryError::Storage("point ids exhausted".into()))?;
    new.insert(META_POINT_BASE, &next.to_be_bytes())?;
    new.flush()?;
    // One blob is superseded by nothing; with several, a leaf's consolidation supersedes the
    // blobs it was made of.
    let scratch = copied.blob_sized > 1;
    if scratch {
        release_superseded_blobs(&new, &target, copied.blob_bytes)?;
    }
    drop(new);
    drop(old);
    wait_until_closed(&target, LOCK_WAIT)?;
    wait_until_closed(dir, LOCK_WAIT)?;
    sync_tree(&target)?;
    Ok((store_disk_bytes(&target)?, scratch))
}

/// Removes the copy a compaction gave up (a failed or unprofitable one); says why not when
/// it could not (the next open removes it).
fn discard_copy(dir: &Path) -> String {
    let copy = dir.join(COMPACTING);
    // A handle still open (the copy's lock not yet released) is waited for.
    let _ = wait_until_closed(&copy, LOCK_WAIT);
    match remove_dir_all(&copy).and_then(|()| sync_dir(dir)) {
        Ok(()) => String::new(),
        Err(e) => format!(" (the copy stays until the next open: {e})"),
    }
}

/// What [`compact_locked`] did: the report of a compaction, and the old store still open
/// when it opened it and compacted nothing (so that opening need not open it again).
struct Compacted {
    report: Option<CompactReport>,
    open: Option<sled::Db>,
}

impl Compacted {
    fn nothing(open: Option<sled::Db>) -> Self {
        Self { report: None, open }
    }
}

/// [`SledStore::compact_if_worthwhile`], with the compaction lock held and any earlier
/// compaction recovered.
fn compact_locked(
    dir: &Path,
    min_waste_bytes: u64,
    faults: &CompactFaults,
    steps: &mut Steps,
) -> Result<Compacted> {
    let started = Instant::now();
    if !dir.join("db").exists() {
        return Ok(Compacted::nothing(None)); // a new library
    }
    let disk = store_disk_bytes(dir)?;
    if disk <= min_waste_bytes {
        return Ok(Compacted::nothing(None)); // the garbage is at most `disk`
    }
    let old = open_db(dir, LOCK_WAIT)?;
    let ratio = read_ratio(dir);
    // The experts' metadata bounds the live bytes from below at the cost of one record per
    // expert: most opens stop here, without reading every adapter and instance.
    let lower = live_bytes_lower_bound(&old)?;
    if !worthwhile(disk, lower, min_waste_bytes, ratio) {
        return Ok(Compacted::nothing(Some(old)));
    }
    let live = live_bytes(&old)?;
    if !worthwhile(disk, live, min_waste_bytes, ratio) {
        tracing::debug!(disk, live, ratio, "store compaction not worthwhile");
        return Ok(Compacted::nothing(Some(old)));
    }
    tracing::info!(
        disk_bytes = disk,
        live_bytes = live,
        "compacting the store in {}",
        dir.display()
    );
    let (copy, scratch) = match write_copy(dir, old, live, faults, steps) {
        Ok(copied) => copied,
        Err(e) if is_simulated_crash(&e) => return Err(e),
        Err(e) => {
            let discarded = discard_copy(dir);
            tracing::warn!(
                seconds = started.elapsed().as_secs_f64(),
                "store compaction failed, the store is unchanged: {e}{discarded}"
            );
            return Ok(Compacted::nothing(None));
        }
    };
    write_ratio(dir, copy, scratch, live);
    if copy >= disk {
        let discarded = discard_copy(dir);
        tracing::info!(
            disk_bytes = disk,
            copy_bytes = copy,
            live_bytes = live,
            seconds = started.elapsed().as_secs_f64(),
            "store compaction would not pay off (a fresh copy takes as much), the store is \
             kept{discarded}"
        );
        return Ok(Compacted::nothing(None));
    }
    // Made before the commit: past it, the swap only renames and removes (nothing that a
    // full disk refuses). Recovery removes it with the copy if the commit never happens.
    let moving = dir.join(OLD_MOVING);
    fs::create_dir(&moving).map_err(|e| LibraryError::io(&moving, e))?;
    sync_dir(dir)?;
    steps.step("commit the copy")?;
    rename(&dir.join(COMPACTING), &dir.join(COMPACTED))?;
    sync_dir(dir)?;
    recover(dir, steps).map_err(|e| {
        if is_simulated_crash(&e) {
            e
        } else {
            LibraryError::Storage(format!(
                "store compaction in {}: the compacted copy is complete but swapping it in \
                 failed (the next open goes on with it): {e}",
                dir.display()
            ))
        }
    })?;
    let report = CompactReport {
        disk_bytes_before: disk,
        live_bytes: live,
        disk_bytes_after: store_disk_bytes(dir)?,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        disk_bytes_before = report.disk_bytes_before,
        disk_bytes_after = report.disk_bytes_after,
        live_bytes = report.live_bytes,
        seconds = report.seconds,
        "store compacted: {:.1} MiB of files became {:.1} MiB",
        report.disk_bytes_before as f64 / (1 << 20) as f64,
        report.disk_bytes_after as f64 / (1 << 20) as f64,
    );
    Ok(Compacted {
        report: Some(report),
        open: None,
    })
}

impl SledStore {
    /// Compacts the store in `dir` when it pays off: when more than half of its files is
    /// garbage and the garbage is more than `min_waste_bytes` (see [`worthwhile`]: with
    /// `disk` the bytes of sled's files and `live` those of the keys and values over every
    /// tree, `disk - live > max(min_waste_bytes, live)`, `live` scaled by what the last
    /// compaction measured a fresh copy to take). The live data is copied into a fresh sled
    /// store which is swapped in crash-safely (see above); `None` when nothing was
    /// compacted. Call it with no store open in `dir`: it opens the store itself, and one
    /// held by another process fails as [`Self::open`] does.
    ///
    /// A copy that fails (a full disk) is removed, logged, and leaves the store unchanged:
    /// that is `Ok(None)`. An error means the store could not be opened at all, or a swap
    /// past its commit point could not go on (the next open finishes it).
    pub fn compact_if_worthwhile(
        dir: impl AsRef<Path>,
        min_waste_bytes: u64,
    ) -> Result<Option<CompactReport>> {
        Self::compact_with_faults(dir, min_waste_bytes, CompactFaults::default())
    }

    /// [`Self::compact_if_worthwhile`], then [`Self::open`]; a store found not worth
    /// compacting is not opened twice.
    pub fn open_compacting(
        dir: impl AsRef<Path>,
        min_waste_bytes: u64,
    ) -> Result<(Self, Option<CompactReport>)> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| LibraryError::io(dir, e))?;
        let lock = CompactionLock::acquire(dir, LOCK_WAIT)?;
        let mut steps = Steps::default();
        if let Some(done) = recover(dir, &mut steps)? {
            tracing::warn!("store in {}: {done}", dir.display());
        }
        let compacted =
            compact_locked(dir, min_waste_bytes, &CompactFaults::default(), &mut steps)?;
        let db = match compacted.open {
            Some(db) => db,
            None => open_db(dir, LOCK_WAIT)?,
        };
        drop(lock);
        Ok((Self::with_db(db, dir)?, compacted.report))
    }

    #[doc(hidden)]
    pub fn compact_with_faults(
        dir: impl AsRef<Path>,
        min_waste_bytes: u64,
        faults: CompactFaults,
    ) -> Result<Option<CompactReport>> {
        let dir = dir.as_ref();
        if !dir.exists() {
            return Ok(None);
        }
        let _lock = CompactionLock::acquire(dir, LOCK_WAIT)?;
        let mut steps = Steps {
            crash_before: faults.crash_before_step,
            done: 0,
        };
        if let Some(done) = recover(dir, &mut steps)? {
            tracing::warn!("store in {}: {done}", dir.display());
        }
        Ok(compact_locked(dir, min_waste_bytes, &faults, &mut steps)?.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_waits_for_a_lock_released_moments_later() {
        let dir = tempfile::tempdir().unwrap();
        let held = SledStore::open(dir.path()).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        // Without the wait this open fails at once: the first store still holds the lock.
        let store = SledStore::open_waiting(dir.path(), Duration::from_secs(5)).unwrap();
        releaser.join().unwrap();
        store.check_encoder("e").unwrap();
    }

    #[test]
    fn a_store_held_open_fails_after_the_wait_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _held = SledStore::open(dir.path()).unwrap();
        let started = Instant::now();
        let err = match SledStore::open_waiting(dir.path(), Duration::from_millis(200)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a store another handle holds"),
        };
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            err.contains("held by another open library or process"),
            "{err}"
        );
    }

    #[test]
    fn other_open_errors_fail_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let started = Instant::now();
        assert!(SledStore::open_waiting(file.join("db"), Duration::from_secs(5)).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
