//! `bertrain bench`: performance figures as tables (never timed tests).
//!
//! `bench dataprep` runs `bertrain dataprep` as child processes on a generated corpus of the
//! size of the reference measurement (3.5 MB, 472 documents) and reports wall time per
//! thread count, and peak memory (the child's max RSS) at 1x and 10x the corpus.
//!
//! `bench allreduce` measures the TCP ring's bus bandwidth (NCCL's definition: algorithm
//! bandwidth x 2(n-1)/n) beside raw loopback TCP throughput measured in the same run at
//! the same size, one stream in each direction at once: during an all-reduce every ring
//! link carries the bus bandwidth both ways, so that is the ceiling. Raw TCP moves the same
//! bytes between buffers of the same size, because a 256 MB gradient buffer lives in
//! memory, not in cache, and moving it costs TCP itself about 15% more than resending one
//! cached megabyte.
//!
//! `bench checkpoint` measures what a checkpoint costs training (the copy of parameters and
//! optimizer state, taken between steps) and how long the background write takes.
//!
//! `bench scaling` runs the demo's job with 1 and 2 worker processes and splits the step
//! time into compute, communication and data wait (see [`scaling`]).
//!
//! `bench dense` compares the dense op's cuBLASLt products with burn's on a GPU (see
//! [`dense`]).
//!
//! `bench train` measures one full training step (forward + backward + all-reduce +
//! AdamW) in tokens/s at sequence length 128, beside the figures of HF transformers
//! `BertForPreTraining` on torch 2.15 measured on the same 2-core machine (fp32, 2
//! threads, batch 32, or 8 for base, seq 128, AdamW).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use bertrain_coordinator::job::{Backend, Precision};
use bertrain_worker::DeviceChoice;

mod allreduce;
mod checkpoint;
mod dataprep;
mod dense;
mod scaling;
mod step;
mod train;

use allreduce::bench_allreduce;
use checkpoint::bench_checkpoint;
use dataprep::{bench_dataprep, in_work_dir};
use train::{bench_train, dataset_rank, random_batch, rank_collective, train_rank};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(clap::Subcommand)]
enum BenchKind {
    /// Dataprep wall time by thread count, and peak memory at 1x and 10x the corpus.
    Dataprep {
        /// Where the corpora, vocabulary and outputs go (removed at the end).
        #[arg(long, default_value = "bench-dataprep")]
        work_dir: PathBuf,
        /// Thread counts to time, comma-separated.
        #[arg(long, default_value = "1,2")]
        threads: String,
        /// Runs of each row, alternating between thread counts; the table gives the median.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Ring all-reduce bus bandwidth on loopback against raw TCP, 1 MB to 256 MB.
    Allreduce {
        /// Ranks (threads in this process, each with its own sockets).
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Largest buffer in MB (sizes double from 1 MB).
        #[arg(long, default_value_t = 256)]
        max_mb: usize,
    },
    /// Where a training step's time goes, on the CPU or a GPU: the whole step split into
    /// dense layers, attention, other kernels, optimizer and all-reduce, in ms and TFLOP/s.
    Step {
        /// Model presets, comma-separated.
        #[arg(long, default_value = "base")]
        presets: String,
        /// Sequence lengths, comma-separated (full-length random sequences).
        #[arg(long, default_value = "128")]
        seq: String,
        /// Tokens per step: `tokens / seq` sequences at each length.
        #[arg(long, default_value_t = 16384)]
        tokens: usize,
        /// Measured runs per part (after 2 warm-up runs).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// GPU index for `--backend cuda`.
        #[arg(long, default_value_t = 0)]
        device: usize,
        #[arg(long, value_enum, default_value = "fp32")]
        precision: Precision,
        /// The device's dense peak in TFLOP/s for the MFU column [default: known GPUs' bf16
        /// peak; none on the CPU].
        #[arg(long)]
        peak_tflops: Option<f64>,
    },
    /// The dense layers' cuBLASLt products against burn's on a GPU: differences of the
    /// outputs and gradients, and time (needs `--features cuda`).
    Dense {
        /// Rows of each product (tokens of a step).
        #[arg(long, default_value_t = 16384)]
        tokens: usize,
        /// Measured runs per row (after 1 warm-up run).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// GPU index.
        #[arg(long, default_value_t = 0)]
        device: usize,
        #[arg(long, value_enum, default_value = "bf16")]
        precision: Precision,
    },
    /// Checkpoint cost: the training stall (copying the state off) and the background write.
    Checkpoint {
        #[arg(long, default_value = "tiny,base")]
        presets: String,
        /// Where checkpoints are written (removed at the end).
        #[arg(long, default_value = "bench-checkpoint")]
        dir: PathBuf,
    },
    /// The demo's job run by `launch` with 1 and 2 workers: tokens/s, and each step's
    /// time split into compute, communication and data wait.
    Scaling {
        /// Worker counts to run, comma-separated (each divides the global batch of 32).
        #[arg(long, default_value = "1,2")]
        workers: String,
        /// Steps per run.
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Where the dataset and runs go (removed at the end).
        #[arg(long, default_value = "bench-scaling")]
        work_dir: PathBuf,
    },
    /// Training-step throughput of model presets on the CPU.
    Train {
        /// Comma-separated presets.
        #[arg(long, default_value = "tiny,mini,base")]
        presets: String,
        /// Measured steps per preset (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Data-parallel worker processes sharing the step's batch (over the TCP ring), each
        /// with cores/N threads: what `bertrain launch` runs on this machine.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Internal: this process is rank R of a `--workers` run.
        #[arg(long, hide = true)]
        rank: Option<usize>,
        /// Internal: the ring addresses of a `--workers` run.
        #[arg(long, hide = true)]
        peers: Option<String>,
        /// Measure the reference in the same run: Hugging Face transformers'
        /// `BertForPreTraining` through `tests/python/hf_train_step.py` with this Python
        /// (which needs torch and transformers). Without it, the ratio is against the
        /// figures measured once on this machine ([`ISSUE_REFERENCE`]), which this shared
        /// machine's speed from day to day makes less fair.
        #[arg(long, value_name = "PYTHON")]
        hf_python: Option<PathBuf>,
        /// Internal: `preset=tokens/s,...` of the reference, for the ranks of a run.
        #[arg(long, hide = true)]
        reference: Option<String>,
        /// Train on the first steps of a dataset instead of random full-length sequences: a
        /// `manifest.json`, or `demo` for the demo's synthetic dataset (made in
        /// `bench-train/`, removed at the end). Each preset then runs three ways: the
        /// padded encoder, the unpadded one training uses, and the unpadded one with length
        /// bins, each counting real tokens only. No HF reference.
        #[arg(long)]
        dataset: Option<String>,
    },
}

/// HF transformers tokens/s on this machine as the issue measured them once (torch 2.15,
/// 2 threads), as `preset=tokens/s` pairs.
const ISSUE_REFERENCE: &str = "tiny=3262,mini=1949,base=284";

/// Sequences per step: 32, or 8 for base (as the reference, tests/python/hf_train_step.py).
fn bench_batch_size(preset: &str) -> usize {
    if preset == "base" { 8 } else { 32 }
}

const SEQ_LEN: usize = 128;

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchKind::Train {
            presets,
            steps,
            workers,
            rank: None,
            hf_python,
            dataset,
            ..
        } => match dataset.as_deref() {
            None => bench_train(&presets, steps, workers, hf_python.as_deref(), None),
            Some(_) if hf_python.is_some() => {
                bail!("--hf-python measures random full-length batches; leave out --dataset")
            }
            Some("demo") => in_work_dir(&std::env::current_dir()?.join("bench-train"), |dir| {
                println!("preparing the demo's dataset (synthetic corpus, 2000 documents) ...");
                let manifest = crate::demo::synthetic_dataset(dir, 2000, 0)?.join("manifest.json");
                bench_train(&presets, steps, workers, None, Some(&manifest))
            }),
            Some(path) => bench_train(&presets, steps, workers, None, Some(Path::new(path))),
        },
        BenchKind::Train {
            presets,
            steps,
            workers,
            rank: Some(rank),
            peers,
            reference,
            dataset,
            ..
        } => {
            let mut collective =
                rank_collective(workers, rank, peers.as_deref().unwrap_or_default())?;
            match dataset {
                Some(manifest) => dataset_rank(
                    &presets,
                    steps,
                    workers,
                    rank,
                    collective.as_mut(),
                    Path::new(&manifest),
                ),
                None => train_rank(
                    &presets,
                    steps,
                    workers,
                    rank,
                    collective.as_mut(),
                    reference.as_deref().unwrap_or(ISSUE_REFERENCE),
                ),
            }
        }
        BenchKind::Dataprep {
            work_dir,
            threads,
            rounds,
        } => bench_dataprep(&work_dir, &threads, rounds),
        BenchKind::Allreduce { ranks, max_mb } => bench_allreduce(ranks, max_mb),
        BenchKind::Checkpoint { presets, dir } => bench_checkpoint(&presets, &dir),
        BenchKind::Step {
            presets,
            seq,
            tokens,
            iters,
            backend,
            device,
            precision,
            peak_tflops,
        } => {
            let choice = DeviceChoice {
                backend,
                index: device,
                precision,
            };
            let bench = step::StepBench {
                presets: presets.split(',').map(|p| p.trim().to_string()).collect(),
                seq_lens: parse_list(&seq, "--seq")?,
                tokens,
                iters,
                precision,
                peak_tflops: bertrain_worker::peak(choice, peak_tflops).map(|p| p.tflops),
                state_on_device: backend == Backend::Cuda,
                label: match backend {
                    Backend::Cpu => "cpu".into(),
                    Backend::Cuda => format!("GPU {device}"),
                },
            };
            bench.check()?;
            bertrain_worker::with_backend(choice, &bench)
        }
        BenchKind::Dense {
            tokens,
            iters,
            device,
            precision,
        } => {
            #[cfg(feature = "cuda")]
            // SAFETY: nothing else runs yet. Set so that the device check below also
            // checks that libcublasLt opens.
            unsafe {
                std::env::set_var(bertrain_model::dense::DENSE_ENV, "cublaslt")
            };
            let choice = DeviceChoice {
                backend: Backend::Cuda,
                index: device,
                precision,
            };
            bertrain_worker::with_backend(
                choice,
                &dense::DenseBench {
                    tokens,
                    iters,
                    precision,
                },
            )
        }
        BenchKind::Scaling {
            workers,
            steps,
            work_dir,
        } => {
            let workers = parse_list(&workers, "--workers")?;
            in_work_dir(&work_dir, |dir| {
                scaling::bench_scaling(dir, &workers, steps)
            })
        }
    }
}

/// A comma-separated list of numbers given to `flag`.
fn parse_list<T: std::str::FromStr>(text: &str, flag: &str) -> Result<Vec<T>> {
    text.split(',')
        .map(|t| {
            t.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {t:?} is not a number"))
        })
        .collect()
}
