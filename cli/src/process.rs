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

/// Returns the heap memory that [`keep_freed_memory`] holds on to once the process has done
/// no work for `idle` (measured by its own CPU time, so requests of every transport, training
/// and index builds all count as work): glibc's `malloc_trim(0)` gives every arena's free
/// pages back to the kernel. Busy, freed memory stays for reuse (no page faults between
/// forward passes); idle, the resident size falls back to what is live. Each trim is counted
/// in `roe_memory_trims_total` and `roe_memory_returned_bytes_total`. Runs on a thread of
/// its own until the process exits; `idle` of zero: never.
pub fn spawn_idle_trimmer(idle: std::time::Duration) {
    if idle.is_zero() || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let tick = (idle / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(1),
    );
    let spawned = std::thread::Builder::new()
        .name("roe-idle-trim".into())
        .spawn(move || {
            let mut last_cpu = cpu_seconds();
            let mut last_busy = std::time::Instant::now();
            // Work since the last trim: nothing to give back otherwise.
            let mut dirty = true;
            loop {
                std::thread::sleep(tick);
                let cpu = cpu_seconds();
                if cpu - last_cpu > BUSY_SHARE * tick.as_secs_f64() {
                    last_busy = std::time::Instant::now();
                    dirty = true;
                }
                last_cpu = cpu;
                if dirty && last_busy.elapsed() >= idle {
                    let before = resident_bytes();
                    trim();
                    let returned = before.saturating_sub(resident_bytes());
                    roe_serving::metrics::memory_trimmed(returned);
                    tracing::debug!(returned_mib = returned >> 20, "idle: freed memory returned");
                    dirty = false;
                    // The trim's own CPU time is not work.
                    last_cpu = cpu_seconds();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the idle memory trimmer did not start");
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
