//! `roe-bench`: the benchmarks and the evaluation report (what `roe bench ...` and `roe eval`
//! run); tables and charts under bench/results/.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use roe_bench::cli::BenchCommand;
use roe_bench::eval::EvalArgs;

#[derive(Parser)]
#[command(name = "roe-bench", version, about = "roe's benchmarks and evaluation")]
struct Cli {
    /// Folder holding the models (filled by scripts/fetch-models.sh).
    #[arg(long, env = "ROE_MODELS_DIR", default_value = "models", global = true)]
    models_dir: PathBuf,
    /// Encoder model folder (default: <models-dir>/all-MiniLM-L6-v2).
    #[arg(long, env = "ROE_ENCODER", global = true)]
    encoder: Option<PathBuf>,
    /// Server address, for benchmarks that measure a running server.
    #[arg(
        long,
        env = "ROE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Bench(BenchCommand),
    /// The evaluation report (bare, oracle, routed, merged, ensemble, leave-one-out) under
    /// bench/results/eval.{md,json,png}.
    Eval(EvalArgs),
}

fn main() -> anyhow::Result<()> {
    roe_cli::process::tune();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Bench(b) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            roe_bench::cli::run(&cli.models_dir, cli.encoder.as_deref(), &cli.server, b, &rt)
        }
        Command::Eval(a) => roe_bench::eval::cmd(&cli.models_dir, cli.encoder.as_deref(), a),
    }
}
