//! Durable expert store on sled. An expert is written in one transaction across three trees
//! (metadata, adapter bytes, instances with their embeddings) and flushed to disk before the
//! write is acknowledged, so an acknowledged expert survives a crash and a half-written one
//! never appears.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::error::{LibraryError, Result};
use crate::expert::{ExpertMeta, Instance, PeftAdapter};

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

pub struct ExpertStore {
    db: sled::Db,
    experts: sled::Tree,
    adapters: sled::Tree,
    instances: sled::Tree,
}

const META_ENCODER: &[u8] = b"encoder";

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

/// Adapter record: u32 length of the config JSON, the JSON, then the safetensors bytes as is.
fn encode_adapter(a: &PeftAdapter) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + a.config_json.len() + a.safetensors.len());
    out.extend_from_slice(&(a.config_json.len() as u32).to_le_bytes());
    out.extend_from_slice(a.config_json.as_bytes());
    out.extend_from_slice(&a.safetensors);
    out
}

fn decode_adapter(b: &[u8]) -> Result<PeftAdapter> {
    let bad = || LibraryError::Storage("corrupt adapter record".into());
    let n = u32::from_le_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let json = b.get(4..4 + n).ok_or_else(bad)?;
    Ok(PeftAdapter {
        config_json: String::from_utf8(json.to_vec()).map_err(|_| bad())?,
        safetensors: b[4 + n..].to_vec(),
    })
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

impl ExpertStore {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    /// Opens the store, waiting up to `wait` for sled's file lock. sled 0.34 releases the lock
    /// from a background thread a moment after the last handle drops (spacejam/sled#1234), so
    /// reopening a store this process (or a process that just exited) closed can briefly find
    /// it locked. A store another live process holds stays locked: that fails after `wait`.
    pub fn open_waiting(path: impl AsRef<Path>, wait: Duration) -> Result<Self> {
        let path = path.as_ref();
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
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
        };
        Ok(Self {
            experts: db.open_tree("experts")?,
            adapters: db.open_tree("adapters")?,
            instances: db.open_tree("instances")?,
            db,
        })
    }

    /// Checks (or, for a new store, records) which encoder embedded the stored instances:
    /// vectors from another encoder would route nonsense.
    pub fn check_encoder(&self, encoder_id: &str) -> Result<()> {
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

    /// A fresh id for an instance vector, unique for the life of the store.
    pub fn next_point_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    pub fn get(&self, id: &str) -> Result<Option<ExpertMeta>> {
        self.experts
            .get(id.as_bytes())?
            .map(|v| decode_meta(&v))
            .transpose()
    }

    pub fn adapter(&self, id: &str) -> Result<Option<PeftAdapter>> {
        self.adapters
            .get(id.as_bytes())?
            .map(|v| decode_adapter(&v))
            .transpose()
    }

    /// Experts in id order, starting after `after` (exclusive), at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ExpertMeta>> {
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

    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    pub fn instances_of(&self, id: &str) -> Result<Vec<StoredInstance>> {
        self.instances
            .scan_prefix(instance_prefix(id))
            .map(|kv| {
                let (_, v) = kv?;
                decode_instance(&v)
            })
            .collect()
    }

    /// Every stored instance, for rebuilding the index at start-up.
    pub fn all_instances(&self) -> impl Iterator<Item = Result<StoredInstance>> + '_ {
        self.instances.iter().map(|kv| {
            let (_, v) = kv?;
            decode_instance(&v)
        })
    }

    /// Writes an expert, replacing whatever was stored under its id (old instances included),
    /// atomically, and flushes before returning. Returns the point ids that were replaced.
    pub fn put_expert(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        instances: &[StoredInstance],
    ) -> Result<Vec<u64>> {
        let old_keys: Vec<sled::IVec> = self
            .instances
            .scan_prefix(instance_prefix(&meta.id))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let old_points = old_keys.iter().filter_map(|k| point_of_key(k)).collect();
        let meta_bytes = encode_meta(meta)?;
        let adapter_bytes = encode_adapter(adapter);
        let rows: Vec<(Vec<u8>, Vec<u8>)> = instances
            .iter()
            .map(|si| Ok((instance_key(&meta.id, si.point_id), encode_instance(si)?)))
            .collect::<Result<_>>()?;
        (&self.experts, &self.adapters, &self.instances)
            .transaction(|(experts, adapters, inst)| {
                for k in &old_keys {
                    inst.remove(k)?;
                }
                for (k, v) in &rows {
                    inst.insert(k.as_slice(), v.as_slice())?;
                }
                adapters.insert(meta.id.as_bytes(), adapter_bytes.as_slice())?;
                experts.insert(meta.id.as_bytes(), meta_bytes.as_slice())?;
                Ok::<_, ConflictableTransactionError<LibraryError>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(old_points)
    }

    /// Adds instances to an existing expert and updates its instance count, atomically.
    pub fn append_instances(&self, meta: &ExpertMeta, instances: &[StoredInstance]) -> Result<()> {
        let meta_bytes = encode_meta(meta)?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = instances
            .iter()
            .map(|si| Ok((instance_key(&meta.id, si.point_id), encode_instance(si)?)))
            .collect::<Result<_>>()?;
        (&self.experts, &self.instances)
            .transaction(|(experts, inst)| {
                for (k, v) in &rows {
                    inst.insert(k.as_slice(), v.as_slice())?;
                }
                experts.insert(meta.id.as_bytes(), meta_bytes.as_slice())?;
                Ok::<_, ConflictableTransactionError<LibraryError>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes an expert with its adapter and instances; returns the removed point ids, or
    /// `None` when there was no such expert.
    pub fn delete(&self, id: &str) -> Result<Option<Vec<u64>>> {
        if self.experts.get(id.as_bytes())?.is_none() {
            return Ok(None);
        }
        let keys: Vec<sled::IVec> = self
            .instances
            .scan_prefix(instance_prefix(id))
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        (&self.experts, &self.adapters, &self.instances)
            .transaction(|(experts, adapters, inst)| {
                for k in &keys {
                    inst.remove(k)?;
                }
                adapters.remove(id.as_bytes())?;
                experts.remove(id.as_bytes())?;
                Ok::<_, ConflictableTransactionError<LibraryError>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(Some(keys.iter().filter_map(|k| point_of_key(k)).collect()))
    }
}

fn point_of_key(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_waits_for_a_lock_released_moments_later() {
        let dir = tempfile::tempdir().unwrap();
        let held = ExpertStore::open(dir.path()).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        // Without the wait this open fails at once: the first store still holds the lock.
        let store = ExpertStore::open_waiting(dir.path(), Duration::from_secs(5)).unwrap();
        releaser.join().unwrap();
        store.check_encoder("e").unwrap();
    }

    #[test]
    fn a_store_held_open_fails_after_the_wait_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _held = ExpertStore::open(dir.path()).unwrap();
        let started = Instant::now();
        let err = match ExpertStore::open_waiting(dir.path(), Duration::from_millis(200)) {
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
        assert!(ExpertStore::open_waiting(file.join("db"), Duration::from_secs(5)).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
