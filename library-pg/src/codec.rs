//! Between roe's types and the database's columns. Metadata and instances are roe's serde
//! JSON in jsonb columns (readable with psql, and a field added later reads as its default);
//! embeddings are f32 little-endian bytes, as the sled store keeps them. PostgreSQL has no
//! unsigned integers: ids, versions and seqs are u64 in roe and bigint here, converted
//! checked both ways.

use postgres::types::{FromSql, Json};
use postgres::Row;
use roe_expert_library::library_store::{Change, ChangeOp};
use roe_expert_library::store::StoredInstance;
use roe_expert_library::{ExpertMeta, Instance, LibraryError, Result};

use crate::error::describe;

/// The columns [`instance_of`] reads, in its order.
pub(crate) const INSTANCE_COLUMNS: &str =
    "point_id, expert_id, instance, embedding, choice_embedding";

/// The columns [`change_of`] reads, in its order.
pub(crate) const CHANGE_COLUMNS: &str = "seq, op, expert_id, version, meta, removed_points";

/// A u64 of roe's as a bigint. Values past `i64::MAX` never occur in practice (ids come from
/// PostgreSQL's own sequences); one that does is the caller's error, not the database's.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| LibraryError::invalid(what, format!("{v} is past PostgreSQL's bigint range")))
}

/// A bigint read from the database as roe's u64; a negative one is a corrupt database.
pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| {
        LibraryError::Storage(format!(
            "the library's database holds a negative {what}: {v}"
        ))
    })
}

/// A count or limit as a bigint parameter (saturating: "at most 2^63" is "all").
pub(crate) fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub(crate) fn f32s(b: &[u8], what: &str) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return Err(LibraryError::Storage(format!(
            "the library's database holds a {what} of {} bytes, not a whole number of f32s",
            b.len()
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Column `idx` of `row`, a decoding failure being a storage error that says what was read.
pub(crate) fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, what: &str) -> Result<T> {
    row.try_get(idx).map_err(|e| {
        LibraryError::Storage(format!(
            "reading {what} from the library's database: {}",
            describe(&e)
        ))
    })
}

pub(crate) fn meta_of(row: &Row, idx: usize) -> Result<ExpertMeta> {
    let Json(meta) = get::<Json<ExpertMeta>>(row, idx, "an expert's metadata")?;
    Ok(meta)
}

/// A row of [`INSTANCE_COLUMNS`].
pub(crate) fn instance_of(row: &Row) -> Result<StoredInstance> {
    let point_id = to_u64(get::<i64>(row, 0, "an instance's point id")?, "point id")?;
    let expert_id: String = get(row, 1, "an instance's expert id")?;
    let Json(instance) = get::<Json<Instance>>(row, 2, "an instance")?;
    let embedding = f32s(get::<&[u8]>(row, 3, "an embedding")?, "embedding")?;
    let choice_embedding = get::<Option<&[u8]>>(row, 4, "a choice embedding")?
        .map(|b| f32s(b, "choice embedding"))
        .transpose()?;
    Ok(StoredInstance {
        point_id,
        expert_id,
        instance,
        embedding,
        choice_embedding,
    })
}

/// A row of [`CHANGE_COLUMNS`].
pub(crate) fn change_of(row: &Row) -> Result<Change> {
    let seq = to_u64(get::<i64>(row, 0, "a change's seq")?, "seq")?;
    let op_text: &str = get(row, 1, "a change's op")?;
    let op = ChangeOp::parse(op_text).ok_or_else(|| {
        LibraryError::Storage(format!(
            "the change log's seq {seq} has an unknown op {op_text:?}"
        ))
    })?;
    let expert_id: String = get(row, 2, "a change's expert id")?;
    let version = to_u64(get::<i64>(row, 3, "a change's version")?, "version")?;
    let meta = get::<Option<Json<ExpertMeta>>>(row, 4, "a change's metadata")?.map(|Json(m)| m);
    let removed_points = get::<Vec<i64>>(row, 5, "a change's removed points")?
        .into_iter()
        .map(|p| to_u64(p, "point id"))
        .collect::<Result<Vec<u64>>>()?;
    Ok(Change {
        seq,
        op,
        expert_id,
        version,
        meta,
        removed_points,
    })
}

/// PostgreSQL's text and jsonb cannot hold the NUL character (sled could): refuse it as the
/// caller's error up front rather than fail the write with an encoding error.
pub(crate) fn check_storable(meta: &ExpertMeta, rows: &[StoredInstance]) -> Result<()> {
    let json = serde_json::to_string(meta)
        .map_err(|e| LibraryError::Storage(format!("encoding expert {}: {e}", meta.id)))?;
    // serde_json writes NUL as this escape, which jsonb refuses.
    if json.contains("\\u0000") {
        return Err(nul("metadata"));
    }
    for si in rows {
        let i = &si.instance;
        let texts = std::iter::once(&i.input)
            .chain(i.target.as_ref())
            .chain(i.choices.iter());
        for t in texts {
            if t.contains('\0') {
                return Err(nul("instances"));
            }
        }
    }
    Ok(())
}

pub(crate) fn check_config_storable(config_json: &str) -> Result<()> {
    if config_json.contains('\0') {
        return Err(nul("adapter.adapter_config_json"));
    }
    Ok(())
}

fn nul(field: &str) -> LibraryError {
    LibraryError::invalid(
        field,
        "holds a NUL character (\\u0000), which the library's PostgreSQL database cannot store",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip() {
        let v = vec![0.0f32, -1.5, f32::MAX, 1e-30];
        assert_eq!(f32s(&f32_bytes(&v), "x").unwrap(), v);
        assert!(f32s(&[0, 0, 0], "x").is_err());
    }

    #[test]
    fn conversions_are_checked() {
        assert_eq!(to_i64(7, "x").unwrap(), 7);
        assert!(to_i64(u64::MAX, "x").is_err());
        assert!(to_u64(-1, "x").is_err());
        assert_eq!(limit_i64(usize::MAX), i64::MAX);
    }
}
