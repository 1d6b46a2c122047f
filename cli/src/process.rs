//! Process-wide tuning that `roe` and `roe-bench` apply first thing in `main`.

/// Applies the tunings below (each can be switched off by its environment variable).
pub fn tune() {
    fix_thread_count();
    if std::env::var_os("ROE_DEFAULT_MALLOC").is_none() {
        keep_freed_memory();
    }
}

/// glibc returns every large freed block (activations, scratch matrices: megabytes each) to
/// the kernel, so the next forward pass page-faults and zeroes the same memory again — ~6% of
/// an encoder pass. Keeping freed memory in the heap makes it reusable at once; the resident
/// size then stays at its high-water mark instead of shrinking between requests.
/// `ROE_DEFAULT_MALLOC=1` keeps glibc's defaults.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator tunables; called first thing in main, before any
    // other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// How busy the process must be, in CPU time per wall time, for a tick to count as work:
/// an idle server's own timers and this thread stay far below it.
const BUSY_SHARE: f64 = 0.05;

/// When the heap memory that [`keep_freed_memory`] holds on to goes back to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReturn {
    /// Once the process has done no work this long (zero: never).
    pub idle: std::time::Duration,
    /// At once, busy or not, when the resident memory beyond the live heap allocations
    /// passes this (0: no bound): under a long mixed load every thread's arena keeps its own
    /// high-water mark of freed memory.
    pub max_kept_bytes: u64,
}

/// Returns the heap memory that [`keep_freed_memory`] holds on to, as `when` says: glibc's
/// `malloc_trim(0)` gives every arena's free pages back to the kernel. Work is measured by the
/// process's own CPU time, so requests of every transport, training and index builds all
/// count. Busy and under the bound, freed memory stays for reuse (no page faults between
/// forward passes); idle, the resident size falls back to what is live. Each return is
/// counted in `roe_memory_trims_total` and `roe_memory_returned_bytes_total`. Runs on a
/// thread of its own until the process exits.
pub fn spawn_memory_returner(when: MemoryReturn) {
    let bounded = when.max_kept_bytes > 0;
    if (when.idle.is_zero() && !bounded) || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let second = std::time::Duration::from_secs(1);
    let tick = if when.idle.is_zero() {
        second
    } else {
        (when.idle / 4).clamp(std::time::Duration::from_millis(50), second)
    };
    let spawned = std::thread::Builder::new()
        .name("roe-memory-return".into())
        .spawn(move || {
            let mut last_cpu = cpu_seconds();
            let mut last_busy = std::time::Instant::now();
            let mut last_bound_check = std::time::Instant::now();
            // Work since the last return: nothing to give back otherwise.
            let mut dirty = true;
            loop {
                std::thread::sleep(tick);
                let cpu = cpu_seconds();
                if cpu - last_cpu > BUSY_SHARE * tick.as_secs_f64() {
                    last_busy = std::time::Instant::now();
                    dirty = true;
                }
                last_cpu = cpu;
                let idle = !when.idle.is_zero() && dirty && last_busy.elapsed() >= when.idle;
                // mallinfo2 walks every arena: about once a second is enough.
                let over = bounded
                    && last_bound_check.elapsed() >= second
                    && roe_serving::metrics::HeapStats::read().is_some_and(|h| {
                        // What is resident beyond the live allocations: freed memory kept
                        // (the allocator's own free count also holds pages already given
                        // back, so it cannot say this).
                        resident_bytes().saturating_sub(h.allocated_bytes) > when.max_kept_bytes
                    });
                if bounded && last_bound_check.elapsed() >= second {
                    last_bound_check = std::time::Instant::now();
                }
                if idle || over {
                    let before = resident_bytes();
                    trim();
                    let returned = before.saturating_sub(resident_bytes());
                    roe_serving::metrics::memory_trimmed(returned);
                    tracing::debug!(
                        returned_mib = returned >> 20,
                        reason = if idle {
                            "idle"
                        } else {
                            "over --max-kept-free-mb"
                        },
                        "freed memory returned"
                    );
                    // A return while busy leaves the idle one due: what the work in flight
                    // frees after it is kept until the process goes idle.
                    if idle {
                        dirty = false;
                    }
                    // The return's own CPU time is not work.
                    last_cpu = cpu_seconds();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the memory returner did not start");
    }
}

/// User and system CPU seconds of the whole process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn resident_bytes() -> u64 {
    roe_serving::metrics::ProcessStats::read().map_or(0, |p| p.resident_bytes)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// candle asks for its thread count on every matmul and, unless `RAYON_NUM_THREADS` is set,
/// works it out by reading /proc/cpuinfo each time (a measurable share of a forward pass).
/// Working it out once here, before any thread starts, removes that cost; an explicit
/// setting is kept.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
