//! `roe`: serve the Retrieval-of-Experts service, manage experts, route, score, generate and
//! answer.

fn main() -> anyhow::Result<()> {
    roe_cli::process::tune();
    roe_cli::cli::main()
}
