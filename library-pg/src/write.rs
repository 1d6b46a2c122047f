//! The bodies of the write transactions. Each write is one transaction that:
//!
//! 1. takes the next seq: `UPDATE library_meta SET head_seq = head_seq + 1 RETURNING
//!    head_seq`. The row lock it takes is held until commit, so writers on every replica
//!    queue here: seqs are gapless (a rolled-back write gives its seq back) and commit in
//!    seq order, which is what lets a follower read the log as "everything after my seq";
//! 2. locks the expert's row and checks the write's expectation (compare-and-set), exactly
//!    as the sled store does;
//! 3. checks and updates the quota counters;
//! 4. writes, appends the change log row, and `pg_notify`s the followers (delivered at
//!    commit, and only if it commits).
//!
//! Everything here runs on a transaction the caller opened; a `Failure::Lib` return (an
//! expectation or quota refusal) drops the transaction, which rolls it back.

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{Json, Type};
use postgres::Transaction;
use roe_expert_library::library_store::{ChangeOp, Expect, Quota, Written};
use roe_expert_library::store::StoredInstance;
use roe_expert_library::{ExpertMeta, LibraryError, PeftAdapter};

use crate::codec::{f32_bytes, get, to_i64, to_u64};
use crate::error::Failure;

/// Adapter bytes per `adapter_chunks` row.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// The channel followers LISTEN on. The payload (the seq) is informative only.
pub(crate) const CHANNEL: &str = "roe_changes";

type TxResult<T> = std::result::Result<T, Failure>;

/// The expert's row as a write finds it (locked).
struct Current {
    version: u64,
    stored_bytes: u64,
}

pub(crate) fn put(
    mut tx: Transaction<'_>,
    meta: &ExpertMeta,
    adapter: &PeftAdapter,
    adapter_key: &[u8],
    rows: &[StoredInstance],
    expect: Expect,
    quota: &Quota,
) -> TxResult<Written> {
    let id = meta.id.as_str();
    let version = to_i64(meta.version, "version")?;
    let seq = next_seq(&mut tx)?;
    let seq_i64 = to_i64(seq, "seq")?;
    let current = lock_expert(&mut tx, id)?;
    expect.check(id, current.as_ref().map(|c| c.version))?;
    charge(&mut tx, id, current.as_ref(), quota)?;
    // Every adapter this expert's versions hold now: those no version references after
    // this write are removed at its end.
    let held: Vec<Vec<u8>> = tx
        .query(
            "SELECT adapter_sha256 FROM expert_versions \
             WHERE expert_id = $1 AND adapter_sha256 IS NOT NULL",
            &[&id],
        )?
        .iter()
        .map(|r| get::<Vec<u8>>(r, 0, "an adapter's hash"))
        .collect::<Result<_, _>>()?;
    store_adapter(&mut tx, adapter_key, adapter)?;
    tx.execute(
        "INSERT INTO expert_versions \
             (expert_id, version, content_sha256, adapter_sha256, meta, created_seq) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (expert_id, version) DO UPDATE SET \
             content_sha256 = EXCLUDED.content_sha256, \
             adapter_sha256 = EXCLUDED.adapter_sha256, \
             meta = EXCLUDED.meta, \
             created_seq = EXCLUDED.created_seq",
        &[
            &id,
            &version,
            &meta.weights_sha256,
            &adapter_key,
            &Json(meta),
            &seq_i64,
        ],
    )?;
    let removed_points = remove_instances(&mut tx, id)?;
    insert_instances(&mut tx, id, version, seq_i64, rows)?;
    let stored_bytes = to_i64(quota.expert_bytes, "expert bytes")?;
    tx.execute(
        "INSERT INTO experts (id, current_version, meta, stored_bytes) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO UPDATE SET \
             current_version = EXCLUDED.current_version, \
             meta = EXCLUDED.meta, \
             stored_bytes = EXCLUDED.stored_bytes",
        &[&id, &version, &Json(meta), &stored_bytes],
    )?;
    // Superseded versions stay as history, without their adapter.
    tx.execute(
        "UPDATE expert_versions SET adapter_sha256 = NULL \
         WHERE expert_id = $1 AND version <> $2 AND adapter_sha256 IS NOT NULL",
        &[&id, &version],
    )?;
    remove_unreferenced_adapters(&mut tx, &held)?;
    log_change(
        &mut tx,
        seq,
        ChangeOp::Put,
        id,
        meta.version,
        Some(meta),
        &removed_points,
    )?;
    notify(&mut tx, seq)?;
    tx.commit().map_err(Failure::Commit)?;
    Ok(Written {
        seq,
        removed_points,
    })
}

pub(crate) fn append(
    mut tx: Transaction<'_>,
    meta: &ExpertMeta,
    rows: &[StoredInstance],
    expect: Expect,
    quota: &Quota,
) -> TxResult<Written> {
    let id = meta.id.as_str();
    let seq = next_seq(&mut tx)?;
    let current = lock_expert(&mut tx, id)?;
    // Instances go to an existing expert, whatever the caller said (as sled).
    let expect = match expect {
        Expect::Any | Expect::Absent => Expect::Present,
        e => e,
    };
    expect.check(id, current.as_ref().map(|c| c.version))?;
    let Some(current) = current else {
        return Err(not_found(id).into());
    };
    // The metadata written must be the current version's: a writer holding an older
    // version's metadata lost a race with a newer version.
    if meta.version != current.version {
        return Err(LibraryError::Aborted {
            id: id.to_string(),
            expected: meta.version,
            actual: current.version,
        }
        .into());
    }
    // What the expert holds now, not what the caller saw: another replica's append may
    // have committed in between (appends keep the version).
    let after = Quota {
        expert_bytes: current.stored_bytes.saturating_add(quota.expert_bytes),
        ..*quota
    };
    charge(&mut tx, id, Some(&current), &after)?;
    let held: i64 = tx
        .query_one(
            "SELECT count(*) FROM instances WHERE expert_id = $1",
            &[&id],
        )?
        .try_get(0)?;
    let mut meta = meta.clone();
    meta.num_instances = to_u64(held, "instance count")? as usize + rows.len();
    let version = to_i64(current.version, "version")?;
    insert_instances(&mut tx, id, version, to_i64(seq, "seq")?, rows)?;
    let stored_bytes = to_i64(after.expert_bytes, "expert bytes")?;
    tx.execute(
        "UPDATE experts SET meta = $2, stored_bytes = $3 WHERE id = $1",
        &[&id, &Json(&meta), &stored_bytes],
    )?;
    log_change(
        &mut tx,
        seq,
        ChangeOp::Append,
        id,
        meta.version,
        Some(&meta),
        &[],
    )?;
    notify(&mut tx, seq)?;
    tx.commit().map_err(Failure::Commit)?;
    Ok(Written {
        seq,
        removed_points: Vec::new(),
    })
}

/// `None` (nothing written, the transaction rolled back and its seq given back) when there
/// was no such expert and `expect` allows that.
pub(crate) fn delete(
    mut tx: Transaction<'_>,
    id: &str,
    expect: Expect,
) -> TxResult<Option<Written>> {
    let seq = next_seq(&mut tx)?;
    let Some(current) = lock_expert(&mut tx, id)? else {
        return match expect {
            Expect::Present | Expect::Version(_) => Err(not_found(id).into()),
            // Dropping the transaction rolls it back: no seq is spent on nothing.
            Expect::Absent | Expect::Any => Ok(None),
        };
    };
    let expect = match expect {
        Expect::Absent => Expect::Any,
        e => e,
    };
    expect.check(id, Some(current.version))?;
    let removed_points = remove_instances(&mut tx, id)?;
    tx.execute("DELETE FROM experts WHERE id = $1", &[&id])?;
    let held: Vec<Vec<u8>> = tx
        .query(
            "DELETE FROM expert_versions WHERE expert_id = $1 RETURNING adapter_sha256",
            &[&id],
        )?
        .iter()
        .map(|r| get::<Option<Vec<u8>>>(r, 0, "an adapter's hash"))
        .filter_map(Result::transpose)
        .collect::<Result<_, _>>()?;
    remove_unreferenced_adapters(&mut tx, &held)?;
    let freed = to_i64(current.stored_bytes, "expert bytes")?;
    tx.execute(
        "UPDATE quota_counters SET experts = GREATEST(experts - 1, 0), \
             library_bytes = GREATEST(library_bytes - $1, 0)",
        &[&freed],
    )?;
    log_change(
        &mut tx,
        seq,
        ChangeOp::Delete,
        id,
        current.version,
        None,
        &removed_points,
    )?;
    notify(&mut tx, seq)?;
    tx.commit().map_err(Failure::Commit)?;
    Ok(Some(Written {
        seq,
        removed_points,
    }))
}

/// Takes the next change log seq, and with it the library-wide writer lock (module docs).
fn next_seq(tx: &mut Transaction<'_>) -> TxResult<u64> {
    let row = tx
        .query_opt(
            "UPDATE library_meta SET head_seq = head_seq + 1 RETURNING head_seq",
            &[],
        )?
        .ok_or_else(|| missing_row("library_meta"))?;
    Ok(to_u64(get::<i64>(&row, 0, "the head seq")?, "seq")?)
}

fn lock_expert(tx: &mut Transaction<'_>, id: &str) -> TxResult<Option<Current>> {
    let Some(row) = tx.query_opt(
        "SELECT current_version, stored_bytes FROM experts WHERE id = $1 FOR UPDATE",
        &[&id],
    )?
    else {
        return Ok(None);
    };
    Ok(Some(Current {
        version: to_u64(get::<i64>(&row, 0, "an expert's version")?, "version")?,
        stored_bytes: to_u64(get::<i64>(&row, 1, "an expert's bytes")?, "stored bytes")?,
    }))
}

/// Checks the library-wide quotas for the expert holding `quota.expert_bytes` after this
/// write (replacing what it held), and records it in the counters.
fn charge(
    tx: &mut Transaction<'_>,
    id: &str,
    current: Option<&Current>,
    quota: &Quota,
) -> TxResult<()> {
    let row = tx
        .query_opt(
            "SELECT experts, library_bytes FROM quota_counters FOR UPDATE",
            &[],
        )?
        .ok_or_else(|| missing_row("quota_counters"))?;
    let experts = to_u64(get::<i64>(&row, 0, "the expert count")?, "expert count")?;
    let bytes = to_u64(get::<i64>(&row, 1, "the library's bytes")?, "library bytes")?;
    let experts_after = match current {
        Some(_) => experts,
        None => {
            let max = u64::try_from(quota.max_experts).unwrap_or(u64::MAX);
            if experts >= max {
                return Err(LibraryError::ResourceExhausted(format!(
                    "experts: the library holds {experts}, the quota max_experts is {}",
                    quota.max_experts
                ))
                .into());
            }
            experts + 1
        }
    };
    let old = current.map_or(0, |c| c.stored_bytes);
    let bytes_after = bytes.saturating_sub(old).saturating_add(quota.expert_bytes);
    if bytes_after > quota.max_library_bytes {
        return Err(LibraryError::ResourceExhausted(format!(
            "library bytes: storing expert {id} ({} bytes) would bring the library to \
             {bytes_after} bytes, over max_library_bytes {}",
            quota.expert_bytes, quota.max_library_bytes
        ))
        .into());
    }
    tx.execute(
        "UPDATE quota_counters SET experts = $1, library_bytes = $2",
        &[
            &to_i64(experts_after, "expert count")?,
            &to_i64(bytes_after, "library bytes")?,
        ],
    )?;
    Ok(())
}

/// Stores the adapter under its content hash, unless an identical one is stored already.
fn store_adapter(tx: &mut Transaction<'_>, key: &[u8], adapter: &PeftAdapter) -> TxResult<()> {
    let bytes = to_i64(adapter.safetensors.len() as u64, "adapter bytes")?;
    let inserted = tx.execute(
        "INSERT INTO adapters (sha256, config_json, bytes) VALUES ($1, $2, $3) \
         ON CONFLICT (sha256) DO NOTHING",
        &[&key, &adapter.config_json, &bytes],
    )?;
    if inserted == 0 {
        return Ok(());
    }
    let insert =
        tx.prepare("INSERT INTO adapter_chunks (sha256, idx, data) VALUES ($1, $2, $3)")?;
    for (i, chunk) in adapter.safetensors.chunks(CHUNK_BYTES).enumerate() {
        let idx = i32::try_from(i).map_err(|_| {
            LibraryError::ResourceExhausted(format!(
                "adapter.adapter_model_safetensors: {} bytes is more than the library's \
                 database holds for one adapter",
                adapter.safetensors.len()
            ))
        })?;
        tx.execute(&insert, &[&key, &idx, &chunk])?;
    }
    Ok(())
}

/// Deletes the adapters among `candidates` that no version references any more (their
/// chunks go with them: ON DELETE CASCADE).
fn remove_unreferenced_adapters(tx: &mut Transaction<'_>, candidates: &[Vec<u8>]) -> TxResult<()> {
    if candidates.is_empty() {
        return Ok(());
    }
    tx.execute(
        "DELETE FROM adapters a WHERE a.sha256 = ANY($1) \
         AND NOT EXISTS (SELECT 1 FROM expert_versions v WHERE v.adapter_sha256 = a.sha256)",
        &[&candidates],
    )?;
    Ok(())
}

/// Deletes the expert's instances; their point ids, ascending.
fn remove_instances(tx: &mut Transaction<'_>, id: &str) -> TxResult<Vec<u64>> {
    let mut points = tx
        .query(
            "DELETE FROM instances WHERE expert_id = $1 RETURNING point_id",
            &[&id],
        )?
        .iter()
        .map(|r| to_u64(get::<i64>(r, 0, "a point id")?, "point id"))
        .collect::<Result<Vec<u64>, _>>()?;
    points.sort_unstable();
    Ok(points)
}

/// Adds the rows with COPY (binary): one round trip for the lot, where an INSERT a row
/// would be one each.
fn insert_instances(
    tx: &mut Transaction<'_>,
    id: &str,
    version: i64,
    seq: i64,
    rows: &[StoredInstance],
) -> TxResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    // Converted before the COPY starts: an error in the middle would abort it.
    let points = rows
        .iter()
        .map(|si| to_i64(si.point_id, "point_id"))
        .collect::<Result<Vec<i64>, _>>()?;
    let sink = tx.copy_in(
        "COPY instances \
             (point_id, expert_id, version, added_seq, instance, embedding, choice_embedding) \
         FROM STDIN (FORMAT binary)",
    )?;
    let mut writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT8,
            Type::TEXT,
            Type::INT8,
            Type::INT8,
            Type::JSONB,
            Type::BYTEA,
            Type::BYTEA,
        ],
    );
    for (si, point) in rows.iter().zip(&points) {
        let embedding = f32_bytes(&si.embedding);
        // Kept as given, whatever its dimension (sled's record format drops one whose
        // dimension differs from the embedding's; nothing here needs to).
        let choice = si.choice_embedding.as_deref().map(f32_bytes);
        writer.write(&[
            point,
            &id,
            &version,
            &seq,
            &Json(&si.instance),
            &embedding,
            &choice,
        ])?;
    }
    writer.finish()?;
    Ok(())
}

fn log_change(
    tx: &mut Transaction<'_>,
    seq: u64,
    op: ChangeOp,
    id: &str,
    version: u64,
    meta: Option<&ExpertMeta>,
    removed_points: &[u64],
) -> TxResult<()> {
    let removed = removed_points
        .iter()
        .map(|&p| to_i64(p, "point id"))
        .collect::<Result<Vec<i64>, _>>()?;
    tx.execute(
        "INSERT INTO change_log (seq, op, expert_id, version, meta, removed_points) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &to_i64(seq, "seq")?,
            &op.as_str(),
            &id,
            &to_i64(version, "version")?,
            &meta.map(Json),
            &removed,
        ],
    )?;
    Ok(())
}

/// Rings the followers' doorbell; PostgreSQL delivers it when (and only if) the
/// transaction commits.
fn notify(tx: &mut Transaction<'_>, seq: u64) -> TxResult<()> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()])?;
    Ok(())
}

fn not_found(id: &str) -> LibraryError {
    LibraryError::NotFound {
        what: "expert",
        id: id.to_string(),
    }
}

fn missing_row(table: &str) -> Failure {
    Failure::Lib(LibraryError::Storage(format!(
        "the library's database has no {table} row: it was not set up by roe's migrations"
    )))
}
