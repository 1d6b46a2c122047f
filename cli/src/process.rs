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
