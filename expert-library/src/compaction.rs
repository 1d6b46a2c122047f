//! Background compaction of the routing state's indexes.
//!
//! Deletes and new versions leave tombstones; once an index's tombstones reach its
//! `compact_ratio` it is compacted (tombstoned rows dropped, the HNSW graph rebuilt). At a
//! million vectors the rebuild takes minutes, and so does dumping the result; done inline
//! under the routing write lock (as it once was) it blocked every Route for that long — a
//! waiting writer also blocks new readers in parking_lot — and every write behind it.
//!
//! So each library owns one worker thread, and one compaction runs at a time. A write that
//! leaves an index due for compaction wakes it ([`Compactor::request`]); a round then
//! 1. copies the live rows of every format's index out, a chunk of [`SNAPSHOT_CHUNK`] rows
//!    per short read lock (every format, so that the dump below is one private set: a format
//!    without tombstones costs one extra build, in the background);
//! 2. builds the new indexes from the copies without any lock (routing meanwhile goes on
//!    against the old indexes, tombstones filtered);
//! 3. dumps the new indexes while they are still private to it ([`crate::persist::Dumps`];
//!    skipped when writes happened since the snapshot, as such a dump would be stale);
//! 4. swaps them in under the write mutex and a short write lock, after replaying the
//!    writes made since the snapshot (see [`crate::index`]): the result is the one a
//!    synchronous compaction would give.
//!
//! While a round runs, the old and the new indexes live side by side: memory peaks at about
//! twice the index (vectors and graphs) for the length of the build.
//!
//! Dropping the library cancels a running round (it is polled between chunks and graph
//! batches) and joins the worker; nothing is lost, as sled holds every write and the old
//! indexes hold them all too. A worker that fails or panics logs it and leaves the old
//! indexes in place.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{LibraryError, Result};
use crate::expert::TextFormat;
use crate::index::{CompactedIndex, VectorIndex};
use crate::persist::Dumps;
use crate::retrieval::{RoutingState, FORMATS};

/// Rows copied per read lock while snapshotting (a few MB of vectors: microseconds).
pub const SNAPSHOT_CHUNK: usize = 16 * 1024;

/// What the worker shares with the library.
pub(crate) struct CompactionContext {
    pub state: Arc<RwLock<RoutingState>>,
    /// The library's write mutex: the swap takes it so that it waits where writes wait,
    /// never queued on the routing lock behind a long reader.
    pub writes: Arc<Mutex<()>>,
    pub dumps: Arc<Dumps>,
}

#[derive(Default)]
struct Status {
    /// A round was asked for and has not started yet.
    requested: bool,
    running: bool,
    /// Live [`CompactionHold`]s: rounds wait before their swap while any exists.
    holds: usize,
    /// A round is waiting on the holds.
    held: bool,
    shutdown: bool,
    /// Rounds that swapped new indexes in.
    swapped: u64,
}

struct Signal {
    status: Mutex<Status>,
    changed: Condvar,
}

impl Signal {
    fn cancelled(&self) -> bool {
        self.status.lock().shutdown
    }

    /// Waits while a hold exists; false when shut down meanwhile.
    fn wait_for_release(&self) -> bool {
        let mut s = self.status.lock();
        if s.holds > 0 {
            s.held = true;
            self.changed.notify_all();
            while s.holds > 0 && !s.shutdown {
                self.changed.wait(&mut s);
            }
            s.held = false;
        }
        !s.shutdown
    }
}

/// The library's compaction worker.
pub(crate) struct Compactor {
    signal: Arc<Signal>,
    worker: Option<JoinHandle<()>>,
}

/// While it lives, background compactions stop just before their swap (after building and
/// dumping), so that a test can route and write during a compaction deterministically.
/// [`crate::library::ExpertLibrary::wait_for_compaction`] would wait for ever meanwhile.
pub struct CompactionHold {
    signal: Arc<Signal>,
}

impl CompactionHold {
    /// Waits until a round has built (and dumped) its indexes and waits on this hold; false
    /// when none did within `timeout`.
    pub fn wait_until_reached(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.signal.status.lock();
        while !s.held {
            if self.signal.changed.wait_until(&mut s, deadline).timed_out() {
                return s.held;
            }
        }
        true
    }

    /// A round waits on this hold.
    pub fn reached(&self) -> bool {
        self.signal.status.lock().held
    }
}

impl Drop for CompactionHold {
    fn drop(&mut self) {
        let mut s = self.signal.status.lock();
        s.holds = s.holds.saturating_sub(1);
        self.signal.changed.notify_all();
    }
}

/// How a round ended.
enum Round {
    /// No index was due (any more).
    Nothing,
    Cancelled,
    Swapped,
}

impl Compactor {
    pub(crate) fn spawn(context: CompactionContext) -> Result<Self> {
        let signal = Arc::new(Signal {
            status: Mutex::new(Status::default()),
            changed: Condvar::new(),
        });
        let worker_signal = signal.clone();
        let worker = std::thread::Builder::new()
            .name("roe-compaction".into())
            .spawn(move || work(&context, &worker_signal))
            .map_err(|e| LibraryError::Index(format!("starting the compaction worker: {e}")))?;
        Ok(Self {
            signal,
            worker: Some(worker),
        })
    }

    /// Asks for a round (cheap; rounds asked for while one runs make one more round).
    pub(crate) fn request(&self) {
        let mut s = self.signal.status.lock();
        if !s.shutdown {
            s.requested = true;
            self.signal.changed.notify_all();
        }
    }

    /// A round is asked for or running.
    pub(crate) fn is_busy(&self) -> bool {
        let s = self.signal.status.lock();
        s.requested || s.running
    }

    /// Rounds that swapped compacted indexes in so far.
    pub(crate) fn swapped(&self) -> u64 {
        self.signal.status.lock().swapped
    }

    /// Waits until no round is asked for or running.
    pub(crate) fn wait_idle(&self) {
        let mut s = self.signal.status.lock();
        while (s.requested || s.running) && !s.shutdown {
            self.signal.changed.wait(&mut s);
        }
    }

    pub(crate) fn hold(&self) -> CompactionHold {
        self.signal.status.lock().holds += 1;
        CompactionHold {
            signal: self.signal.clone(),
        }
    }

    /// Cancels a running round and joins the worker.
    pub(crate) fn shutdown(&mut self) {
        {
            let mut s = self.signal.status.lock();
            s.shutdown = true;
            self.signal.changed.notify_all();
        }
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the compaction worker panicked");
            }
        }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(context: &CompactionContext, signal: &Signal) {
    loop {
        {
            let mut s = signal.status.lock();
            while !s.requested && !s.shutdown {
                signal.changed.wait(&mut s);
            }
            if s.shutdown {
                s.running = false;
                signal.changed.notify_all();
                return;
            }
            s.requested = false;
            s.running = true;
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| round(context, signal)));
        // Deletes during the round may have made an index due again.
        let again =
            matches!(outcome, Ok(Ok(Round::Swapped))) && context.state.read().needs_compaction();
        let mut s = signal.status.lock();
        s.running = false;
        s.requested |= again && !s.shutdown;
        match outcome {
            Ok(Ok(Round::Swapped)) => s.swapped += 1,
            Ok(Ok(Round::Nothing | Round::Cancelled)) => {}
            Ok(Err(e)) => tracing::warn!("background compaction failed: {e}"),
            Err(_) => tracing::error!("background compaction panicked; the old index stays"),
        }
        signal.changed.notify_all();
    }
}

fn round(context: &CompactionContext, signal: &Signal) -> Result<Round> {
    let started = std::time::Instant::now();
    let cancelled = || signal.cancelled();
    // 1. Snapshot, a chunk per read lock.
    let (version, mut snapshots) = {
        let state = context.state.read();
        if !state.needs_compaction() {
            return Ok(Round::Nothing);
        }
        let snapshots = FORMATS
            .iter()
            .map(|f| Ok((*f, state.begin_compaction(*f)?)))
            .collect::<Result<Vec<_>>>()?;
        (context.dumps.applied(), snapshots)
    };
    for (format, snapshot) in &mut snapshots {
        loop {
            if cancelled() {
                return Ok(Round::Cancelled);
            }
            let done =
                context
                    .state
                    .read()
                    .copy_for_compaction(*format, snapshot, SNAPSHOT_CHUNK)?;
            if done {
                break;
            }
        }
    }
    let snapshot_seconds = started.elapsed().as_secs_f64();
    // 2. Build, without any lock.
    let mut built: Vec<(TextFormat, CompactedIndex)> = Vec::with_capacity(snapshots.len());
    for (format, snapshot) in snapshots {
        match snapshot.build(&cancelled) {
            Some(compacted) => built.push((format, compacted)),
            None => return Ok(Round::Cancelled),
        }
    }
    let build_seconds = started.elapsed().as_secs_f64() - snapshot_seconds;
    // 3. Dump while private, unless writes since the snapshot made it stale already.
    {
        let held = context.dumps.lock();
        if cancelled() {
            return Ok(Round::Cancelled);
        }
        if context.dumps.applied() == version {
            let indexes: Vec<(TextFormat, &VectorIndex)> =
                built.iter().map(|(f, c)| (*f, c.index())).collect();
            match context.dumps.write(&held, version, &indexes) {
                Ok(report) => tracing::info!(
                    graphs = report.graphs,
                    bytes = report.bytes,
                    seconds = report.seconds,
                    "compacted index persisted"
                ),
                Err(e) => tracing::warn!("could not persist the compacted index: {e}"),
            }
        } else {
            tracing::debug!("writes during the compaction: its dump would be stale, skipped");
        }
    }
    // 4. Swap in, replaying the writes made since the snapshot.
    if !signal.wait_for_release() {
        return Ok(Round::Cancelled);
    }
    let _w = context.writes.lock();
    let mut state = context.state.write();
    let swap_started = std::time::Instant::now();
    let mut replayed = (0, 0);
    for (format, compacted) in built {
        let report = state.swap_in_compacted(format, compacted)?;
        replayed.0 += report.inserted;
        replayed.1 += report.removed;
    }
    tracing::info!(
        vectors = state.num_vectors(),
        snapshot_seconds,
        build_seconds,
        swap_ms = swap_started.elapsed().as_secs_f64() * 1e3,
        replayed_inserts = replayed.0,
        replayed_removals = replayed.1,
        "index compacted in the background"
    );
    // Rows appended during the compaction go into the new graph without the routing lock.
    drop(state);
    crate::retrieval::run_graph_work(&context.state);
    Ok(Round::Swapped)
}
