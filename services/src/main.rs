//! `roe`: serve the Retrieval-of-Experts service, manage experts, route, and benchmark.

mod cli;

fn main() -> anyhow::Result<()> {
    cli::main()
}
