//! The library's source of truth behind one trait: sled on one machine ([`crate::store::SledStore`],
//! the embedded default) or PostgreSQL shared by replicas ([`crate::pg_store::PgStore`]).
//!
//! Every write is one transaction that also appends a [`Change`] to the store's change log
//! and returns the log's sequence number (`library_seq`). Sequence numbers are gapless and
//! in commit order, so a replica that applies the log from its last applied seq, in order,
//! holds exactly the library as of that seq. The trait is synchronous: the library above it
//! is, and its callers already run it on blocking threads.

use serde::{Deserialize, Serialize};

use crate::error::{LibraryError, Result};
use crate::expert::{ExpertMeta, PeftAdapter};
use crate::store::StoredInstance;

/// Where a write expects the expert to be (compare-and-set, checked inside the write's
/// transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A registration of a new id: an existing expert is ALREADY_EXISTS.
    Absent,
    /// The expert must exist, at whatever version (AddInstances, a new version without a
    /// stated one): a missing expert is NOT_FOUND.
    Present,
    /// Either: a new version of an existing expert, or its first.
    Any,
    /// The expert must be at exactly this version: another is ABORTED, none NOT_FOUND.
    Version(u64),
}

impl Expect {
    /// The compare-and-set check of a write to expert `id` against the version stored now
    /// (`None`: no such expert), done by every store inside the write's transaction.
    pub fn check(self, id: &str, stored: Option<u64>) -> Result<()> {
        match (self, stored) {
            (Expect::Absent, Some(version)) => Err(LibraryError::AlreadyExists {
                id: id.to_string(),
                version,
            }),
            (Expect::Present | Expect::Version(_), None) => Err(LibraryError::NotFound {
                what: "expert",
                id: id.to_string(),
            }),
            (Expect::Version(expected), Some(actual)) if actual != expected => {
                Err(LibraryError::Aborted {
                    id: id.to_string(),
                    expected,
                    actual,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The library-wide quotas a write must stay within, checked inside the write's transaction
/// so that replicas writing at once cannot pass them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_experts: usize,
    pub max_library_bytes: u64,
    /// By the library's count (`library::stored_bytes`): for a put, the bytes the expert
    /// takes after it (its adapter and every instance); for an append, the bytes the added
    /// instances take (the store adds them to what it holds, which another replica's append
    /// may have changed since the caller looked).
    pub expert_bytes: u64,
}

impl Quota {
    /// No limits: for stores written outside the quotas (tests, tools).
    pub fn unlimited(expert_bytes: u64) -> Self {
        Self {
            max_experts: usize::MAX,
            max_library_bytes: u64::MAX,
            expert_bytes,
        }
    }
}

/// What a committed write reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The change log's sequence number of this write.
    pub seq: u64,
    /// Point ids the write removed (the replaced version's instances, or a deleted expert's).
    pub removed_points: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// An expert registered, replaced by a new version, or written by a merge.
    Put,
    /// Instances added to an expert.
    Append,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Append => "append",
            Self::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "put" => Some(Self::Put),
            "append" => Some(Self::Append),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// One entry of the change log: enough for a replica to apply the write to its routing
/// state without reading anything else but the instances the write added
/// ([`LibraryStore::instances_of_change`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub op: ChangeOp,
    pub expert_id: String,
    /// The expert's version after the change (a delete: the version removed).
    pub version: u64,
    /// The expert's metadata after the change; `None` for a delete.
    pub meta: Option<ExpertMeta>,
    /// Point ids the change removed from the index, in the order they were stored.
    pub removed_points: Vec<u64>,
}

/// One item of a [`LibraryStore::snapshot`].
#[derive(Debug)]
pub enum SnapshotItem {
    /// Boxed: metadata are few, instances many (and small).
    Meta(Box<ExpertMeta>),
    Instance(StoredInstance),
}

/// The library's durable store. Writes are atomic and durable when they return; reads see
/// committed writes only.
pub trait LibraryStore: Send + Sync {
    /// What the store is, for messages and health (`sled`, `postgresql`).
    fn kind(&self) -> &'static str;

    /// Whether other processes write to this store too (replicas), so the library must
    /// follow its change log; a store one process owns changes only through that process.
    fn is_shared(&self) -> bool {
        false
    }

    /// Waits until another process may have written (a notification), at most `timeout`;
    /// true when woken early. Only a doorbell: a missed one costs latency, never a change,
    /// since the follower reads the log after every wait. A store nobody else writes just
    /// sleeps.
    fn wait_for_change(&self, timeout: std::time::Duration) -> Result<bool> {
        std::thread::sleep(timeout);
        Ok(false)
    }

    /// Checks (or, for a new store, records) which encoder embedded the stored instances.
    fn check_encoder(&self, encoder_id: &str) -> Result<()>;

    /// `n` fresh ids for instance vectors, unique for the life of the store.
    fn next_point_ids(&self, n: usize) -> Result<Vec<u64>>;

    fn get(&self, id: &str) -> Result<Option<ExpertMeta>>;

    fn adapter(&self, id: &str) -> Result<Option<PeftAdapter>>;

    /// Experts in id order, starting after `after` (exclusive), at most `limit`.
    fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<ExpertMeta>>;

    fn len(&self) -> Result<usize>;

    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    fn instances_of(&self, id: &str) -> Result<Vec<StoredInstance>>;

    /// Every expert and every instance as of one sequence number, which it returns: a
    /// replica built from it and then from the log after that seq misses nothing.
    fn snapshot(&self, f: &mut dyn FnMut(SnapshotItem) -> Result<()>) -> Result<u64>;

    /// Writes an expert version with its adapter and instances, replacing whatever version
    /// was stored under its id (its instances included).
    fn put_expert(
        &self,
        meta: &ExpertMeta,
        adapter: &PeftAdapter,
        rows: &[StoredInstance],
        expect: Expect,
        quota: &Quota,
    ) -> Result<Written>;

    /// Adds instances to an existing expert and stores its updated metadata.
    fn append_instances(
        &self,
        meta: &ExpertMeta,
        rows: &[StoredInstance],
        expect: Expect,
        quota: &Quota,
    ) -> Result<Written>;

    /// Removes an expert with its adapter and instances; `None` when there was none.
    fn delete(&self, id: &str, expect: Expect) -> Result<Option<Written>>;

    /// The sequence number of the last committed write (0: none yet).
    fn head_seq(&self) -> Result<u64>;

    /// Changes with a seq above `seq`, in order, at most `limit`. A store that keeps only
    /// the recent log (sled) fails with FAILED_PRECONDITION for a seq it no longer holds.
    fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>>;

    /// The instances `change` added that are still stored (a later change may have removed
    /// them; it removes them from the index too).
    fn instances_of_change(&self, change: &Change) -> Result<Vec<StoredInstance>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_are_checked_against_the_stored_version() {
        assert!(Expect::Absent.check("a", None).is_ok());
        assert!(Expect::Any.check("a", None).is_ok());
        assert!(matches!(
            Expect::Absent.check("a", Some(2)),
            Err(LibraryError::AlreadyExists { version: 2, .. })
        ));
        assert!(matches!(
            Expect::Present.check("a", None),
            Err(LibraryError::NotFound { .. })
        ));
        assert!(matches!(
            Expect::Version(1).check("a", None),
            Err(LibraryError::NotFound { .. })
        ));
        assert!(matches!(
            Expect::Version(2).check("a", Some(3)),
            Err(LibraryError::Aborted {
                expected: 2,
                actual: 3,
                ..
            })
        ));
        assert!(Expect::Version(3).check("a", Some(3)).is_ok());
        assert!(Expect::Present.check("a", Some(3)).is_ok());
    }
}
