//! `bertrain`: the one binary of the project, installed on every node.
//!
//! Each subcommand belongs to one crate; this file only parses the command line, sets up
//! logging and turns errors into one line and a non-zero exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use allocator::Workload;

mod allocator;
mod bench;
mod demo;
mod export;
mod fill_mask;
mod model_info;
mod plot;

#[derive(Parser)]
#[command(
    name = "bertrain",
    version,
    about = "Distributed data-parallel BERT pretraining"
)]
struct Cli {
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo end to end on the CPU.
    Demo(demo::DemoArgs),
    /// Write a synthetic English-like corpus (the demo's and the tests' data).
    SynthCorpus(bertrain_dataprep::cli::SynthCorpusArgs),
    /// Train a WordPiece vocabulary on a corpus.
    Vocab(bertrain_dataprep::cli::VocabArgs),
    /// Turn a corpus into Parquet shards of MLM/NSP instances.
    Dataprep(bertrain_dataprep::cli::DataprepArgs),
    /// Show a dataset's or a shard's instances and statistics.
    Inspect(bertrain_dataprep::cli::InspectArgs),
    /// Predict the [MASK] tokens of a sentence with a trained model.
    FillMask(fill_mask::FillMaskArgs),
    /// Fine-tune a pretrained model for classification or regression (GLUE-style) and
    /// report its validation metrics.
    Finetune(bertrain_finetune::FinetuneArgs),
    /// Draw a run's training curves (loss, accuracy, learning rate, throughput) as SVG.
    Plot(plot::PlotArgs),
    /// Write a checkpoint as a Hugging Face model directory.
    Export(export::ExportArgs),
    /// Parameter count and training FLOPs per token of a model config.
    ModelInfo(model_info::ModelInfoArgs),
    /// Run a training job: rendezvous, data order, progress, status over HTTP.
    Coordinator(bertrain_coordinator::CoordinatorArgs),
    /// Join a job as one training process (one per device).
    Worker(bertrain_worker::WorkerArgs),
    /// Run a whole job on this machine: a coordinator and N workers.
    Launch(bertrain_coordinator::LaunchArgs),
    /// Benchmarks that print a table.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let streams_data = matches!(
        cli.command,
        Command::SynthCorpus(_) | Command::Vocab(_) | Command::Dataprep(_) | Command::Inspect(_)
    );
    allocator::tune_for(if streams_data {
        Workload::Streaming
    } else {
        Workload::Training
    });
    init_logging(cli.log_format);
    // A panic is a bug in bertrain, not a user error: say so in one line, no backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (please report): {info}");
    }));
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::SynthCorpus(args) => bertrain_dataprep::cli::run_synth_corpus(args),
        Command::Vocab(args) => bertrain_dataprep::cli::run_vocab(args),
        Command::Dataprep(args) => bertrain_dataprep::cli::run_dataprep(args),
        Command::Inspect(args) => bertrain_dataprep::cli::run_inspect(args),
        Command::FillMask(args) => fill_mask::run(args),
        Command::Finetune(args) => bertrain_finetune::run(args).map(|_| ()),
        Command::Export(args) => export::run(args),
        Command::Plot(args) => plot::run(args),
        Command::ModelInfo(args) => model_info::run(args),
        Command::Coordinator(args) => bertrain_coordinator::run(args),
        Command::Worker(args) => bertrain_worker::run(args),
        Command::Launch(args) => bertrain_coordinator::launch::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: `launch` relays its children's logs through pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
