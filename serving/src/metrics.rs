//! What the serving core counts for monitoring, through the `metrics` facade: nothing is
//! recorded unless the process installs a recorder (`roe serve` installs the Prometheus
//! exporter that `/metrics` renders). Every name is here, in Prometheus' conventions
//! (`roe_` prefix, base units, `_total` counters), so that the dashboards have one list.

use std::time::Duration;

use metrics::Unit;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const REQUESTS: &str = "roe_requests_total";
pub const REQUEST_DURATION: &str = "roe_request_duration_seconds";
pub const SCORE_QUEUE_DEPTH: &str = "roe_score_queue_depth";
pub const SCORE_BATCH_SIZE: &str = "roe_score_batch_size";
pub const SCORE_BATCH_DURATION: &str = "roe_score_batch_duration_seconds";
pub const GENERATE_QUEUE_DEPTH: &str = "roe_generate_queue_depth";
pub const GENERATE_BATCH_SIZE: &str = "roe_generate_batch_size";
pub const GENERATED_TOKENS: &str = "roe_generated_tokens_total";
pub const TIME_TO_FIRST_TOKEN: &str = "roe_time_to_first_token_seconds";
pub const EXPERT_CACHE_HITS: &str = "roe_expert_cache_hits_total";
pub const EXPERT_CACHE_MISSES: &str = "roe_expert_cache_misses_total";
pub const EXPERT_LOADS: &str = "roe_expert_loads_total";
pub const EXPERT_LOAD_DURATION: &str = "roe_expert_load_duration_seconds";
pub const EXPERT_CACHE_BYTES: &str = "roe_expert_cache_bytes";
pub const UPLOAD_BYTES_IN_FLIGHT: &str = "roe_upload_bytes_in_flight";
pub const UPLOAD_REFUSALS: &str = "roe_upload_refusals_total";
// The process's own, under the names Prometheus' client libraries give them, so that the
// usual dashboards and alerts find them.
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_PEAK_RESIDENT_MEMORY: &str = "process_resident_memory_max_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const HEAP_ALLOCATED: &str = "roe_heap_allocated_bytes";
pub const HEAP_FREE: &str = "roe_heap_free_bytes";
pub const MEMORY_TRIMS: &str = "roe_memory_trims_total";
pub const MEMORY_RETURNED: &str = "roe_memory_returned_bytes_total";

/// Why a registration was refused by the upload bounds (the `reason` label of
/// [`UPLOAD_REFUSALS`]): a fixed set, so that clients cannot mint label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRefusal {
    /// Larger than the whole byte budget: refused without waiting.
    OverBudget,
    /// No room in the byte budget within the queue timeout.
    BudgetTimeout,
    /// No place among the streamed registrations within the queue timeout.
    StreamsTimeout,
}

impl UploadRefusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::OverBudget => "over_budget",
            Self::BudgetTimeout => "budget_timeout",
            Self::StreamsTimeout => "streams_timeout",
        }
    }
}

/// Registers the descriptions and units of the serving core's metrics with the recorder.
pub fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests by transport (grpc, http), endpoint (gRPC method or HTTP route) and status \
         (gRPC code name or HTTP status)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "From a request's arrival to the end of its response (a stream's last message)"
    );
    describe_gauge!(
        SCORE_QUEUE_DEPTH,
        "Score inputs waiting for a batch (not yet in a forward pass)"
    );
    describe_histogram!(SCORE_BATCH_SIZE, "Inputs per Score batch");
    describe_histogram!(
        SCORE_BATCH_DURATION,
        Unit::Seconds,
        "Time a Score batch spent in the backbone"
    );
    describe_gauge!(
        GENERATE_QUEUE_DEPTH,
        "Generations waiting to join a decoding batch"
    );
    describe_histogram!(
        GENERATE_BATCH_SIZE,
        "Rows decoding together, recorded at each admission"
    );
    describe_counter!(GENERATED_TOKENS, "Tokens generated, over all streams");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From a generation's submission to its first token"
    );
    describe_counter!(EXPERT_CACHE_HITS, "Expert lookups served from the cache");
    describe_counter!(
        EXPERT_CACHE_MISSES,
        "Expert lookups that had to wait for a load (overlapping misses count each)"
    );
    describe_counter!(
        EXPERT_LOADS,
        "Experts read from the library and loaded (overlapping misses share one)"
    );
    describe_histogram!(
        EXPERT_LOAD_DURATION,
        Unit::Seconds,
        "Time to read, parse and check an expert's weights"
    );
    describe_gauge!(
        EXPERT_CACHE_BYTES,
        Unit::Bytes,
        "Bytes of the experts the cache holds"
    );
    describe_gauge!(
        UPLOAD_BYTES_IN_FLIGHT,
        Unit::Bytes,
        "Bytes of the upload budget (--max-upload-bytes-in-flight) held by registrations in \
         progress"
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory of the process (Linux: VmRSS), read at each scrape"
    );
    describe_gauge!(
        PROCESS_PEAK_RESIDENT_MEMORY,
        Unit::Bytes,
        "Peak resident memory of the process since it started (Linux: VmHWM)"
    );
    describe_gauge!(
        PROCESS_VIRTUAL_MEMORY,
        Unit::Bytes,
        "Virtual memory of the process (Linux: VmSize)"
    );
    describe_gauge!(PROCESS_OPEN_FDS, "File descriptors the process holds open");
    describe_gauge!(
        HEAP_ALLOCATED,
        Unit::Bytes,
        "Heap memory the process's allocations hold (glibc mallinfo2: in use in the arenas \
         and in mmapped blocks)"
    );
    describe_gauge!(
        HEAP_FREE,
        Unit::Bytes,
        "Freed heap memory in the allocator's free lists, resident (kept for reuse) or \
         already returned to the kernel; resident memory beyond roe_heap_allocated_bytes is \
         what is kept"
    );
    describe_counter!(
        MEMORY_TRIMS,
        "Times freed heap memory was returned to the kernel after the process went idle \
         (--idle-trim-ms)"
    );
    describe_counter!(
        MEMORY_RETURNED,
        Unit::Bytes,
        "Resident memory those returns gave back"
    );
    describe_counter!(
        UPLOAD_REFUSALS,
        "Registrations refused by the upload bounds, by reason (over_budget, budget_timeout, \
         streams_timeout)"
    );
}

/// Which server a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

/// Counts one finished request and its latency. `endpoint` must come from a bounded set
/// (the servers pass known methods and routes only).
pub fn request_done(transport: Transport, endpoint: &str, status: &str, took: Duration) {
    let labels = [
        ("transport", transport.label().to_string()),
        ("endpoint", endpoint.to_string()),
    ];
    counter!(
        REQUESTS,
        &[&labels[..], &[("status", status.to_string())]].concat()
    )
    .increment(1);
    histogram!(REQUEST_DURATION, &labels).record(took.as_secs_f64());
}

pub(crate) fn score_queued(n: usize) {
    gauge!(SCORE_QUEUE_DEPTH).increment(n as f64);
}

pub(crate) fn score_dequeued(n: usize) {
    gauge!(SCORE_QUEUE_DEPTH).decrement(n as f64);
}

pub(crate) fn score_batch(size: usize, took: Duration) {
    histogram!(SCORE_BATCH_SIZE).record(size as f64);
    histogram!(SCORE_BATCH_DURATION).record(took.as_secs_f64());
}

pub(crate) fn generate_queued(n: usize) {
    gauge!(GENERATE_QUEUE_DEPTH).increment(n as f64);
}

pub(crate) fn generate_dequeued(n: usize) {
    gauge!(GENERATE_QUEUE_DEPTH).decrement(n as f64);
}

pub(crate) fn generate_batch(rows: usize) {
    histogram!(GENERATE_BATCH_SIZE).record(rows as f64);
}

pub(crate) fn token_generated() {
    counter!(GENERATED_TOKENS).increment(1);
}

pub(crate) fn first_token(after: Duration) {
    histogram!(TIME_TO_FIRST_TOKEN).record(after.as_secs_f64());
}

pub(crate) fn cache_lookup(hit: bool) {
    if hit {
        counter!(EXPERT_CACHE_HITS).increment(1);
    } else {
        counter!(EXPERT_CACHE_MISSES).increment(1);
    }
}

pub(crate) fn expert_loaded(took: Duration) {
    counter!(EXPERT_LOADS).increment(1);
    histogram!(EXPERT_LOAD_DURATION).record(took.as_secs_f64());
}

pub(crate) fn cache_bytes(bytes: u64) {
    gauge!(EXPERT_CACHE_BYTES).set(bytes as f64);
}

/// A registration took `bytes` more of the upload budget.
pub fn upload_bytes_held(bytes: u64) {
    gauge!(UPLOAD_BYTES_IN_FLIGHT).increment(bytes as f64);
}

/// A registration gave `bytes` of the upload budget back (stored, refused or abandoned).
pub fn upload_bytes_released(bytes: u64) {
    gauge!(UPLOAD_BYTES_IN_FLIGHT).decrement(bytes as f64);
}

pub fn upload_refused(reason: UploadRefusal) {
    counter!(UPLOAD_REFUSALS, "reason" => reason.label()).increment(1);
}

/// The process's memory and open file descriptors, as the kernel reports them now: called
/// before each scrape is rendered. Reads `/proc/self` on Linux; elsewhere records nothing.
/// One return of freed heap memory to the kernel after the process went idle.
pub fn memory_trimmed(returned_bytes: u64) {
    counter!(MEMORY_TRIMS).increment(1);
    counter!(MEMORY_RETURNED).increment(returned_bytes);
}

pub fn record_process() {
    let Some(process) = ProcessStats::read() else {
        return;
    };
    gauge!(PROCESS_RESIDENT_MEMORY).set(process.resident_bytes as f64);
    gauge!(PROCESS_PEAK_RESIDENT_MEMORY).set(process.peak_resident_bytes as f64);
    gauge!(PROCESS_VIRTUAL_MEMORY).set(process.virtual_bytes as f64);
    if let Some(fds) = process.open_fds {
        gauge!(PROCESS_OPEN_FDS).set(fds as f64);
    }
    if let Some(heap) = HeapStats::read() {
        gauge!(HEAP_ALLOCATED).set(heap.allocated_bytes as f64);
        gauge!(HEAP_FREE).set(heap.free_bytes as f64);
    }
}

/// Where the heap's memory is: held by live allocations, or freed and kept by the allocator.
/// RSS far above `allocated_bytes` is memory kept for reuse, not a leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    pub allocated_bytes: u64,
    pub free_bytes: u64,
}

impl HeapStats {
    /// glibc's counts over every arena (None elsewhere). Walks the arenas under their locks:
    /// for a scrape, not for a hot path.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn read() -> Option<Self> {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping.
        let m = unsafe { libc::mallinfo2() };
        Some(Self {
            allocated_bytes: (m.uordblks + m.hblkhd) as u64,
            free_bytes: m.fordblks as u64,
        })
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn read() -> Option<Self> {
        None
    }
}

/// What `/proc/self` says of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub virtual_bytes: u64,
    /// None where `/proc/self/fd` cannot be listed.
    pub open_fds: Option<u64>,
}

impl ProcessStats {
    /// None where `/proc/self/status` cannot be read (not Linux).
    pub fn read() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Some(Self::parse(&status, open_fds))
    }

    /// The `VmRSS`, `VmHWM` and `VmSize` lines of a `/proc/<pid>/status` ("VmRSS:  1234 kB").
    fn parse(status: &str, open_fds: Option<u64>) -> Self {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        Self {
            resident_bytes: kib("VmRSS"),
            peak_resident_bytes: kib("VmHWM"),
            virtual_bytes: kib("VmSize"),
            open_fds,
        }
    }
}

#[cfg(test)]
mod process_tests {
    use super::ProcessStats;

    #[test]
    fn status_lines_are_read_in_bytes() {
        let status = "Name:\troe\nVmPeak:\t  900 kB\nVmSize:\t  800 kB\nVmHWM:\t  300 kB\n\
                      VmRSS:\t  200 kB\n";
        let s = ProcessStats::parse(status, Some(7));
        assert_eq!(
            s,
            ProcessStats {
                resident_bytes: 200 * 1024,
                peak_resident_bytes: 300 * 1024,
                virtual_bytes: 800 * 1024,
                open_fds: Some(7),
            }
        );
        assert_eq!(ProcessStats::parse("", None).resident_bytes, 0);
    }

    #[test]
    fn this_process_is_seen() {
        let read = ProcessStats::read();
        if cfg!(target_os = "linux") {
            let s = read.expect("/proc/self/status is readable on Linux");
            assert!(s.resident_bytes > 1 << 20, "{s:?}");
            assert!(s.peak_resident_bytes >= s.resident_bytes, "{s:?}");
            // stdin, stdout, stderr at least.
            assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        }
    }
}
