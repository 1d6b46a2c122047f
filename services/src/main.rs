//! `roe`: serve the Retrieval-of-Experts service, manage experts, route, and benchmark.

mod cli;

fn main() -> anyhow::Result<()> {
    fix_thread_count();
    cli::main()
}

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
