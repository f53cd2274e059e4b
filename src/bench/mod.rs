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
//! `bench train` measures one full training step (forward + backward + all-reduce +
//! AdamW) in tokens/s at sequence length 128, beside the figures of HF transformers
//! `BertForPreTraining` on torch 2.15 measured on the same 2-core machine (fp32, 2
//! threads, batch 32, or 8 for base, seq 128, AdamW).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_coordinator::job::{Backend, Precision};
use bertrain_dataprep::{Instance, Manifest};
use bertrain_model::init::SplitMix64;
use bertrain_model::{BertConfig, init_bert};
use bertrain_worker::CpuBackend;
use bertrain_worker::batch::HostBatch;
use bertrain_worker::collective::{Collective, LocalCollective, RingListener, RingOptions};
use bertrain_worker::device::DeviceChoice;
use bertrain_worker::loader::{BatchShape, SampleSource, step_data};
use bertrain_worker::optim::{Optimizer, OptimizerConfig};
use bertrain_worker::trainer::Trainer;

mod scaling;
mod step;

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
    /// Where a training step's time goes, on the CPU or a GPU: one matrix product, the
    /// forward pass, forward + backward, and the trainer's step, in ms and TFLOP/s.
    Step {
        /// Model preset.
        #[arg(long, default_value = "base")]
        preset: String,
        /// Sequences per step, comma-separated (each of length 128).
        #[arg(long, default_value = "32,128")]
        batch: String,
        /// Measured runs per row (after 2 warm-up runs).
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
const PREDICTIONS: usize = 20;

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
            preset,
            batch,
            iters,
            backend,
            device,
            precision,
            peak_tflops,
        } => {
            if iters == 0 {
                bail!("--iters must be at least 1");
            }
            let choice = DeviceChoice {
                backend,
                index: device,
                precision,
            };
            let bench = step::StepBench {
                preset,
                batches: parse_list(&batch, "--batch")?,
                iters,
                precision,
                peak_tflops: bertrain_worker::device::peak(choice, peak_tflops).map(|p| p.tflops),
                state_on_device: backend == Backend::Cuda,
            };
            match backend {
                Backend::Cpu => step::run::<CpuBackend>(&bench, Default::default(), "cpu"),
                Backend::Cuda => step_on_gpu(&bench, device),
            }
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

#[cfg(feature = "cuda")]
fn step_on_gpu(bench: &step::StepBench, index: usize) -> Result<()> {
    bertrain_worker::device::check(Backend::Cuda, index)?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    let name = format!("GPU {index}");
    step::run::<burn::backend::Autodiff<burn::backend::Cuda>>(bench, device, &name)
}

#[cfg(not(feature = "cuda"))]
fn step_on_gpu(_bench: &step::StepBench, index: usize) -> Result<()> {
    // Says that this binary has no GPU support, in the worker's words.
    bertrain_worker::device::check(Backend::Cuda, index)
}

fn bench_train(
    presets: &str,
    steps: usize,
    workers: usize,
    hf_python: Option<&Path>,
    dataset: Option<&Path>,
) -> Result<()> {
    if steps == 0 || workers == 0 {
        bail!("--steps and --workers must be at least 1");
    }
    if let Some(manifest) = dataset {
        let manifest = std::path::absolute(manifest)?;
        let data = Manifest::load(&manifest)?;
        println!(
            "training step on {} ({} rows, max_seq_len {}), AdamW, fp32, CPU (Flex), {workers} worker process(es); \
             tokens/s counts real tokens; padding is what attention still pads",
            manifest.display(),
            data.total_rows(),
            data.max_seq_len
        );
        println!(
            "{:<8} {:>6} {:<16} {:>10} {:>12} {:>9} {:>9}",
            "model", "batch", "encoder", "s/step", "tokens/s", "vs padded", "padding"
        );
        let dataset_args = ["--dataset".to_string(), manifest.display().to_string()];
        return run_ranks(presets, steps, workers, &dataset_args, |collective| {
            dataset_rank(presets, steps, 1, 0, collective, &manifest)
        });
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reference = match hf_python {
        Some(python) => hf_reference(python, presets, steps, cores)?,
        None => ISSUE_REFERENCE.to_string(),
    };
    println!(
        "training step, seq {SEQ_LEN}, {PREDICTIONS} predictions/seq, AdamW, fp32, CPU (Flex), {workers} worker process(es); HF torch: {}",
        if hf_python.is_some() {
            "measured just now"
        } else {
            "the issue's figures"
        }
    );
    println!(
        "{:<8} {:>6} {:>10} {:>12} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "model",
        "batch",
        "s/step",
        "tokens/s",
        "HF torch tok/s",
        "ratio",
        "compute s",
        "comm s",
        "optim s"
    );
    let reference_args = ["--reference".to_string(), reference.clone()];
    run_ranks(presets, steps, workers, &reference_args, |collective| {
        train_rank(presets, steps, 1, 0, collective, &reference)
    })
}

/// Runs `alone` in this process with one worker, or else `workers` copies of this program
/// with `extra` arguments, one rank each, sharing the cores.
fn run_ranks(
    presets: &str,
    steps: usize,
    workers: usize,
    extra: &[String],
    alone: impl FnOnce(&mut dyn bertrain_worker::collective::Collective) -> Result<()>,
) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if workers == 1 {
        return alone(&mut LocalCollective);
    }
    let peers: Vec<String> = (0..workers)
        .map(|_| {
            Ok(format!(
                "127.0.0.1:{}",
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port()
            ))
        })
        .collect::<Result<_>>()?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for rank in 0..workers {
        let child = Command::new(&exe)
            .args([
                "bench",
                "train",
                "--presets",
                presets,
                "--steps",
                &steps.to_string(),
            ])
            .args([
                "--workers",
                &workers.to_string(),
                "--rank",
                &rank.to_string(),
                "--peers",
                &peers.join(","),
            ])
            .args(extra)
            .env("RAYON_NUM_THREADS", (cores / workers).max(1).to_string())
            .spawn()
            .context("starting a benchmark rank")?;
        children.push(child);
    }
    let mut failed = false;
    for mut child in children {
        failed |= !child.wait()?.success();
    }
    if failed {
        bail!("a benchmark rank failed");
    }
    Ok(())
}

/// Runs the reference script with `python` on `presets`, with `threads` threads, and
/// returns its tokens/s as `preset=tokens/s,...`.
fn hf_reference(python: &Path, presets: &str, steps: usize, threads: usize) -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hf_train_step.py");
    if !script.exists() {
        bail!(
            "--hf-python needs the reference script {} of the checkout this binary was built from",
            script.display()
        );
    }
    let out = Command::new(python)
        .arg(&script)
        .args([presets, &steps.to_string(), &threads.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed; it needs torch and transformers (pip install torch transformers)",
            python.display(),
            script.display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let measured: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            // model, batch, s/step, tokens/s
            let cols: Vec<&str> = line.split_whitespace().collect();
            Some(format!("{}={}", cols.first()?, cols.get(3)?))
        })
        .collect();
    Ok(measured.join(","))
}

/// One rank's share of `bench train`: the step's batch split over `world` ranks whose
/// gradients are averaged over the TCP ring. Rank 0 prints the rows.
fn train_rank(
    presets: &str,
    steps: usize,
    world: usize,
    rank: usize,
    collective: &mut dyn Collective,
    reference: &str,
) -> Result<()> {
    for preset in presets.split(',').map(str::trim) {
        let config = BertConfig::preset(preset)?;
        let batch_size = bench_batch_size(preset);
        let reference = reference.split(',').find_map(|pair| {
            let (name, tokens_per_s) = pair.split_once('=')?;
            (name == preset).then(|| tokens_per_s.parse::<f64>().ok())?
        });
        let device = Default::default();
        let model = init_bert::<CpuBackend>(&config, 0, &device);
        let optimizer = OptimizerConfig::bert(Optimizer::Adamw, 0.01);
        let mut trainer = Trainer::new(model, optimizer, 1.0, 0, device);
        let local =
            std::slice::from_ref(&random_batch(&config, batch_size / world, 1 + rank as u64))
                .to_vec();
        trainer.step(0, rank, &local, 1e-4, false, collective)?;
        collective.barrier()?;
        let started = Instant::now();
        let mut phases = [0.0f64; 3];
        for step in 1..=steps as u64 {
            let stats = trainer.step(step, rank, &local, 1e-4, false, collective)?;
            for (sum, s) in
                phases
                    .iter_mut()
                    .zip([stats.compute_s, stats.comm_s, stats.optimizer_s])
            {
                *sum += s / steps as f64;
            }
        }
        collective.barrier()?;
        let per_step = started.elapsed().as_secs_f64() / steps as f64;
        let tokens_per_s = (batch_size * SEQ_LEN) as f64 / per_step;
        if rank != 0 {
            continue;
        }
        let (reference, ratio) = match reference {
            Some(r) => (format!("{r:.0}"), format!("{:.2}x", tokens_per_s / r)),
            None => ("-".into(), "-".into()),
        };
        let [compute, comm, optim] = phases;
        println!(
            "{preset:<8} {batch_size:>6} {per_step:>10.3} {tokens_per_s:>12.0} {reference:>14} {ratio:>10} {compute:>10.3} {comm:>10.3} {optim:>10.3}"
        );
    }
    Ok(())
}

/// The ring between the ranks of a `--workers` run (nothing to connect for one).
fn rank_collective(world: usize, rank: usize, peers: &str) -> Result<Box<dyn Collective>> {
    if world == 1 {
        return Ok(Box::new(LocalCollective));
    }
    let peers: Vec<String> = peers.split(',').map(str::to_string).collect();
    let listener = RingListener::bind(&peers[rank])?;
    Ok(Box::new(listener.connect(
        rank,
        &peers,
        &RingOptions::default(),
    )?))
}

/// One rank's share of `bench train --dataset`: the first `steps` steps of the dataset
/// (after one warm-up step) with the padded encoder, the unpadded one, and the unpadded
/// one with length bins. Rank 0 prints the rows, with real tokens summed over the ranks.
fn dataset_rank(
    presets: &str,
    steps: usize,
    world: usize,
    rank: usize,
    collective: &mut dyn Collective,
    manifest: &Path,
) -> Result<()> {
    let data = Manifest::load(manifest)?;
    for preset in presets.split(',').map(str::trim) {
        let mut config = BertConfig::preset(preset)?;
        config.vocab_size = data.vocab_size;
        let batch_size = bench_batch_size(preset);
        if batch_size % world != 0 {
            bail!("--workers {world} must divide the batch of {batch_size}");
        }
        let shape = BatchShape {
            global_batch: batch_size as u64,
            micro_batch: batch_size / world,
            rank,
            world,
        };
        let mut padded_tokens_per_s = None;
        for (encoder, padded, bins) in [
            ("padded", true, false),
            ("unpadded", false, false),
            ("unpadded + bins", false, true),
        ] {
            let source = SampleSource::new(data.clone(), 0, &config)?;
            let mut source = match bins {
                true => source.with_length_bins(batch_size as u64),
                false => source,
            };
            let steps_data = (0..=steps as u64)
                .map(|s| step_data(&mut source, shape, s))
                .collect::<Result<Vec<_>>>()?;
            let model = init_bert::<CpuBackend>(&config, 0, &Default::default());
            let optimizer = OptimizerConfig::bert(Optimizer::Adamw, 0.01);
            let mut trainer = Trainer::new(model, optimizer, 1.0, 0, Default::default());
            trainer.padded = padded;
            // Real tokens and the positions attention sees, summed over the ranks.
            let mut counts = [0.0f32; 2];
            trainer.step(
                0,
                rank,
                &steps_data[0].micro_batches,
                1e-4,
                false,
                collective,
            )?;
            collective.barrier()?;
            let started = Instant::now();
            for data in &steps_data[1..] {
                let stats = trainer.step(
                    data.step,
                    rank,
                    &data.micro_batches,
                    1e-4,
                    false,
                    collective,
                )?;
                counts[0] += stats.tokens as f32;
                counts[1] += stats.tokens as f32 / (1.0 - stats.padding_fraction as f32);
            }
            collective.barrier()?;
            let seconds = started.elapsed().as_secs_f64();
            collective.all_reduce_mean(&mut counts)?;
            let [tokens, positions] = counts.map(|c| c as f64 * world as f64);
            let tokens_per_s = tokens / seconds;
            let baseline = *padded_tokens_per_s.get_or_insert(tokens_per_s);
            if rank == 0 {
                println!(
                    "{preset:<8} {batch_size:>6} {encoder:<16} {:>10.3} {tokens_per_s:>12.0} {:>9} {:>8.1}%",
                    seconds / steps as f64,
                    format!("{:.2}x", tokens_per_s / baseline),
                    100.0 * (1.0 - tokens / positions)
                );
            }
        }
    }
    Ok(())
}

/// Full-length instances of random tokens with `PREDICTIONS` masked positions each.
pub fn random_batch(config: &BertConfig, rows: usize, seed: u64) -> HostBatch {
    let mut rng = SplitMix64::new(seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as u32;
    let instances: Vec<Instance> = (0..rows)
        .map(|_| {
            let input_ids: Vec<u32> = (0..SEQ_LEN)
                .map(|_| 999 + below(config.vocab_size - 999))
                .collect();
            let token_type_ids = (0..SEQ_LEN).map(|i| u8::from(i >= SEQ_LEN / 2)).collect();
            let masked_lm_positions: Vec<u32> =
                (0..PREDICTIONS).map(|k| 1 + (k * 6) as u32).collect();
            let masked_lm_ids = masked_lm_positions
                .iter()
                .map(|&p| input_ids[p as usize])
                .collect();
            Instance {
                input_ids,
                token_type_ids,
                masked_lm_positions,
                masked_lm_ids,
                next_sentence_label: below(2) as u8,
            }
        })
        .collect();
    HostBatch::collate(&instances)
}

/// The reference: the original Python generator on a 3.5 MB, 472-document English corpus
/// (seq 128, dupe_factor 5) on this 2-core machine.
const DATAPREP_REFERENCE_S: f64 = 13.2;
const DATAPREP_REFERENCE_MB: f64 = 188.0;
const DATAPREP_DOCS: usize = 472;

fn bench_dataprep(work_dir: &Path, threads: &str, rounds: usize) -> Result<()> {
    let threads: Vec<usize> = parse_list(threads, "--threads")?;
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    in_work_dir(work_dir, |dir| dataprep_table(dir, &threads, rounds))
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

/// Runs `f` in `work_dir` (absolute), which must not exist yet and is removed afterwards.
fn in_work_dir(work_dir: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if work_dir.exists() {
        bail!(
            "{} exists; choose another --work-dir (the benchmark removes it when done)",
            work_dir.display()
        );
    }
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let dir = work_dir.canonicalize()?;
    let result = f(&dir);
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn dataprep_table(dir: &Path, threads: &[usize], rounds: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    // Long documents (90-162 sentences): 472 of them make the reference's 3.5 MB.
    let corpus = |name: &str, docs: usize| -> Result<PathBuf> {
        let path = dir.join(name);
        let options = bertrain_dataprep::SynthOptions {
            docs,
            seed: 1,
            min_sentences: 90,
            max_sentences: 162,
        };
        // Streamed to the file: a child's peak RSS as `wait4` reports it starts from this
        // process's RSS (the child is spawned from its memory image), so this process must
        // never hold a corpus.
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for (i, doc) in bertrain_dataprep::synth_corpus_with(options).enumerate() {
            if i > 0 {
                out.write_all(b"\n\n")?;
            }
            out.write_all(doc.as_bytes())?;
        }
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(path)
    };
    let small = corpus("corpus-1x.txt", DATAPREP_DOCS)?;
    let large = corpus("corpus-10x.txt", 10 * DATAPREP_DOCS)?;
    let vocab = dir.join("vocab.txt");
    let (status, _) = run_measured(
        Command::new(&exe)
            .args(["vocab", "--vocab-size", "30522", "--input"])
            .arg(&small)
            .arg("--output")
            .arg(&vocab),
    )?;
    if !status {
        bail!("training the benchmark vocabulary failed");
    }
    let vocab_size = std::fs::read_to_string(&vocab)?.lines().count();
    let mb = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6);
    println!(
        "dataprep: seq 128, dupe_factor 5, {vocab_size}-token vocab; reference: original Python generator, {:.1} s, {:.0} MB peak",
        DATAPREP_REFERENCE_S, DATAPREP_REFERENCE_MB
    );
    println!(
        "{:<8} {:>6} {:>8} {:>9} {:>7} {:>8} {:>10} {:>9} {:>8} {:>8}",
        "corpus",
        "MB",
        "threads",
        "wall s",
        "cores",
        "MB/s",
        "vs Python",
        "scaling",
        "ceiling",
        "peak MB"
    );
    let dataprep = |path: &Path, threads: usize, out: &Path| {
        let mut command = Command::new(&exe);
        command
            .args(["dataprep", "--quiet", "--dupe-factor", "5"])
            .args(["--max-seq-len", "128", "--threads", &threads.to_string()])
            .arg("--input")
            .arg(path)
            .arg("--vocab")
            .arg(&vocab)
            .arg("--output")
            .arg(out);
        command
    };
    let mut peaks = Vec::new();
    for (name, path) in [("1x", &small), ("10x", &large)] {
        // Rounds alternate between thread counts, so that a slow spell of this noisy machine
        // does not land on one row only.
        let mut runs: Vec<Vec<ChildRun>> = threads.iter().map(|_| Vec::new()).collect();
        // For each thread count t above 1: wall times of t one-thread runs at once.
        let mut together: Vec<Vec<f64>> = threads.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for ((&t, runs), together) in threads.iter().zip(&mut runs).zip(&mut together) {
                let out = dir.join(format!("out-{name}-{t}"));
                let (ok, run) = run_measured(&mut dataprep(path, t, &out))?;
                if !ok {
                    bail!("dataprep on the {name} corpus failed");
                }
                runs.push(run);
                std::fs::remove_dir_all(&out).ok();
                if t > 1 {
                    let outs: Vec<PathBuf> = (0..t)
                        .map(|i| dir.join(format!("out-{name}-{t}-copy{i}")))
                        .collect();
                    let commands = outs.iter().map(|out| dataprep(path, 1, out)).collect();
                    together.push(run_together(commands)?);
                    for out in &outs {
                        std::fs::remove_dir_all(out).ok();
                    }
                }
            }
        }
        let size = mb(path)?;
        // The median run by wall time, and the wall time at the first thread count for the
        // scaling column.
        let median = |mut walls: Vec<f64>| {
            walls.sort_by(f64::total_cmp);
            walls[walls.len() / 2]
        };
        let mut first_wall = None;
        let mut one_thread_wall = None;
        for ((&t, mut runs), together) in threads.iter().zip(runs).zip(together) {
            runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
            let peak = runs.iter().map(|r| r.peak_mb).fold(0.0, f64::max);
            let run = &runs[runs.len() / 2];
            let wall = run.wall_s;
            if t == 1 {
                one_thread_wall = Some(wall);
            }
            let speedup = if name == "1x" {
                format!("{:.0}x", DATAPREP_REFERENCE_S / wall)
            } else {
                "-".into()
            };
            let scaling = *first_wall.get_or_insert(wall) / wall;
            // What this machine gives t independent one-thread runs: the scaling that
            // perfect parallel code would reach here (shared caches, memory bandwidth and
            // neighbours on the host all count).
            let ceiling = match one_thread_wall {
                Some(one) if t > 1 => format!("{:.2}x", t as f64 * one / median(together)),
                _ => "-".into(),
            };
            println!(
                "{name:<8} {size:>6.1} {t:>8} {wall:>9.3} {:>7.2} {:>8.1} {speedup:>10} {scaling:>8.2}x {ceiling:>8} {peak:>8.0}",
                run.cpu_s / wall,
                size / wall
            );
            peaks.push((name, t, peak));
        }
    }
    println!(
        "median of {rounds} runs per row; cores = CPU time / wall time; ceiling = N one-thread runs at once against one alone, \
         what this machine allows N threads; peak MB = the highest max RSS of the row's runs"
    );
    let last = *threads.last().unwrap_or(&2);
    let peak_of = |n: &str| peaks.iter().find(|p| p.0 == n && p.1 == last).map(|p| p.2);
    if let (Some(a), Some(b)) = (peak_of("1x"), peak_of("10x")) {
        println!(
            "peak memory 10x / 1x corpus at {last} threads: {:.2}",
            b / a
        );
    }
    Ok(())
}

/// What a benchmark child used.
struct ChildRun {
    wall_s: f64,
    /// User plus system CPU time.
    cpu_s: f64,
    /// Peak resident memory.
    peak_mb: f64,
}

/// Runs the commands at once and returns the wall time until the last one ends. Every child
/// started is waited for, also when another fails to start.
fn run_together(commands: Vec<Command>) -> Result<f64> {
    let started = Instant::now();
    let mut children = Vec::new();
    let mut failure = None;
    for mut command in commands {
        match command.stdout(std::process::Stdio::null()).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                failure = Some(anyhow::Error::new(e).context("starting a benchmark child"));
                break;
            }
        }
    }
    for child in &mut children {
        if failure.is_some() {
            child.kill().ok();
        }
        match child.wait() {
            Ok(status) if !status.success() && failure.is_none() => {
                failure = Some(anyhow::anyhow!(
                    "a concurrent dataprep run failed ({status})"
                ));
            }
            Err(e) if failure.is_none() => failure = Some(e.into()),
            _ => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(started.elapsed().as_secs_f64()),
    }
}

/// Runs a child to its end: whether it succeeded, and what it used.
fn run_measured(command: &mut Command) -> Result<(bool, ChildRun)> {
    command.stdout(std::process::Stdio::null());
    let started = Instant::now();
    let child = command.spawn().context("starting a benchmark child")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = started.elapsed().as_secs_f64();
    if pid < 0 {
        bail!(
            "waiting for a benchmark child: {}",
            std::io::Error::last_os_error()
        );
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        ok,
        ChildRun {
            wall_s: wall,
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // ru_maxrss is in KiB on Linux.
            peak_mb: usage.ru_maxrss as f64 * 1024.0 / 1e6,
        },
    ))
}

/// Timing rounds per size (at least); each round times the ring and then raw TCP, and the
/// best round of each is reported, so a burst of noise on this shared machine hits both
/// alike. Small buffers get more rounds ([`allreduce_rounds`]): a 1 MB round lasts a few
/// milliseconds, and one scheduler hiccup on two shared cores is then a large part of it.
const ALLREDUCE_ROUNDS: usize = 10;

/// Rounds for a buffer of `mb` MB: about the same measuring time for every size up to 16 MB.
fn allreduce_rounds(mb: usize) -> usize {
    (ALLREDUCE_ROUNDS * 16 / mb).max(ALLREDUCE_ROUNDS)
}

fn bench_allreduce(ranks: usize, max_mb: usize) -> Result<()> {
    use bertrain_worker::collective::{RingListener, RingOptions, TcpRing};
    if ranks < 2 {
        bail!("--ranks must be at least 2");
    }
    // Two rings: as on one machine (loopback, no checksums) and with every frame
    // checksummed, as between machines.
    let ring = |always_checksum: bool| -> Result<Vec<TcpRing>> {
        let listeners: Vec<RingListener> = (0..ranks)
            .map(|_| RingListener::bind("127.0.0.1:0"))
            .collect::<Result<_>>()?;
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| Ok(l.local_addr()?.to_string()))
            .collect::<Result<_>>()?;
        let options = RingOptions {
            always_checksum,
            ..RingOptions::default()
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (peers, options) = (&peers, &options);
                    s.spawn(move || listener.connect(rank, peers, options))
                })
                .collect();
            join_all(handles)
        })
    };
    let mut rings = ring(false)?;
    let mut checked_rings = ring(true)?;
    let links: Vec<_> = (0..2).map(|_| stream_pair()).collect::<Result<_>>()?;

    println!(
        "ring all-reduce over loopback TCP, {ranks} ranks (threads of this process), best of \
         {ALLREDUCE_ROUNDS} rounds (more below 16 MB); raw: plain TCP moving the same bytes between buffers of \
         the same size, one stream each way at once (what a ring link carries), same socket \
         settings; \"checksummed\": the same ring with a CRC32 on every frame, as between machines"
    );
    println!(
        "{:>6} {:>10} {:>12} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "MB", "time ms", "algbw GB/s", "busbw GB/s", "raw GB/s", "of raw", "checksummed", "of raw"
    );
    let mut mb = 1;
    while mb <= max_mb {
        let bytes = mb << 20;
        // Buffers are allocated and touched before timing: page faults are not the
        // collective's cost.
        let mut buffers: Vec<Vec<f32>> = (0..ranks).map(|_| vec![1.0f32; bytes / 4]).collect();
        let mut raw_buffers: Vec<(Vec<u8>, Vec<u8>)> = (0..2)
            .map(|_| (vec![7u8; bytes], vec![0u8; bytes]))
            .collect();
        let reps = (256 / mb).clamp(2, 16);
        let (mut ring_s, mut checked_s, mut raw_s) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        for _ in 0..allreduce_rounds(mb) {
            ring_s = ring_s.min(time_all_reduce(&mut rings, &mut buffers, reps)?);
            checked_s = checked_s.min(time_all_reduce(&mut checked_rings, &mut buffers, reps)?);
            raw_s = raw_s.min(time_raw_tcp(&links, &mut raw_buffers, reps)?);
        }
        let algbw = bytes as f64 / ring_s / 1e9;
        let busbw_of = |s: f64| bytes as f64 / s / 1e9 * 2.0 * (ranks - 1) as f64 / ranks as f64;
        let (busbw, checked) = (busbw_of(ring_s), busbw_of(checked_s));
        let raw = bytes as f64 / raw_s / 1e9;
        println!(
            "{mb:>6} {:>10.2} {algbw:>12.2} {busbw:>12.2} {raw:>12.2} {:>7.0}% {checked:>12.2} {:>7.0}%",
            ring_s * 1e3,
            100.0 * busbw / raw,
            100.0 * checked / raw
        );
        mb *= 2;
    }
    Ok(())
}

/// Seconds per all-reduce over `reps` back-to-back calls, the slowest rank's (after one
/// warm-up call and a barrier).
fn time_all_reduce(
    rings: &mut [bertrain_worker::collective::TcpRing],
    buffers: &mut [Vec<f32>],
    reps: usize,
) -> Result<f64> {
    use bertrain_worker::collective::Collective;
    let per_rank: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .zip(buffers.iter_mut())
            .map(|(ring, buf)| {
                s.spawn(move || -> Result<f64> {
                    ring.all_reduce_mean(buf)?;
                    ring.barrier()?;
                    let started = Instant::now();
                    for _ in 0..reps {
                        ring.all_reduce_mean(buf)?;
                    }
                    Ok(started.elapsed().as_secs_f64() / reps as f64)
                })
            })
            .collect();
        join_all(handles)
    })?;
    Ok(per_rank.into_iter().fold(0.0, f64::max))
}

/// Seconds to move each pair's send buffer into its receive buffer over plain TCP, both
/// directions at once, in 1 MB writes; the mean of `reps` moves.
fn time_raw_tcp(
    links: &[(std::net::TcpStream, std::net::TcpStream)],
    buffers: &mut [(Vec<u8>, Vec<u8>)],
    reps: usize,
) -> Result<f64> {
    use std::io::{Read, Write};
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for ((tx, rx), (send, recv)) in links.iter().zip(buffers) {
            let (mut tx, mut rx, send) = (tx, rx, &*send);
            handles.push(s.spawn(move || -> Result<()> {
                for _ in 0..reps {
                    for chunk in send.chunks(1 << 20) {
                        tx.write_all(chunk)?;
                    }
                }
                Ok(())
            }));
            handles.push(s.spawn(move || -> Result<()> {
                for _ in 0..reps {
                    for chunk in recv.chunks_mut(1 << 20) {
                        rx.read_exact(chunk)?;
                    }
                }
                Ok(())
            }));
        }
        join_all(handles).map(drop)
    })?;
    Ok(started.elapsed().as_secs_f64() / reps as f64)
}

/// Joins scoped benchmark threads; a panic becomes an error.
fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Result<Vec<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
        })
        .collect()
}

fn stream_pair() -> Result<(std::net::TcpStream, std::net::TcpStream)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let tx = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (rx, _) = listener.accept()?;
    for s in [&tx, &rx] {
        bertrain_worker::collective::tune(s, std::time::Duration::from_secs(60))?;
    }
    Ok((tx, rx))
}

fn bench_checkpoint(presets: &str, dir: &Path) -> Result<()> {
    use bertrain_coordinator::checkpoints::{TRAINER_FORMAT_VERSION, TrainerState};
    use bertrain_model::{BertForPreTraining, ParamLayout};
    use bertrain_worker::checkpoint::{PendingWrite, Snapshot};
    use bertrain_worker::optim::OptimizerState;
    if dir.exists() {
        bail!(
            "{} exists; choose another --dir (the benchmark removes it when done)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let vocab = dir.join("vocab.txt");
    println!(
        "{:<8} {:>12} {:>10} {:>14} {:>14} {:>14}",
        "model", "parameters", "MB", "stall ms 1st", "stall ms next", "write s (bg)"
    );
    let result = (|| -> Result<()> {
        for preset in presets.split(',').map(str::trim) {
            let config = BertConfig::preset(preset)?;
            std::fs::write(
                &vocab,
                (0..config.vocab_size)
                    .map(|i| format!("t{i}\n"))
                    .collect::<String>(),
            )?;
            let layout = ParamLayout::of(&BertForPreTraining::<burn::backend::Flex>::new(
                &config,
                &Default::default(),
            ));
            let params = vec![0.5f32; layout.total];
            let optimizer = OptimizerState {
                step: 1,
                exp_avg: vec![0.1; layout.total],
                exp_avg_sq: vec![0.01; layout.total],
            };
            // What the training thread does: copy the state off; the first checkpoint into
            // fresh buffers, later ones into the previous checkpoint's (Snapshot::refill).
            let started = Instant::now();
            let snapshot = Snapshot {
                config: config.clone(),
                layout: layout.clone(),
                params: params.clone(),
                optimizer: optimizer.clone(),
                trainer: TrainerState {
                    format_version: TRAINER_FORMAT_VERSION,
                    step: 1,
                    epoch: 0,
                    samples_consumed: 256,
                    global_batch_size: 256,
                    lr: 1e-4,
                    seed: 0,
                    world_size: 1,
                    job_hash: String::new(),
                    dataset_hash: String::new(),
                },
                vocab: vocab.clone(),
                tokenizer_config: bertrain_dataprep::Casing {
                    lowercase: true,
                    source: bertrain_dataprep::CasingSource::Trained,
                }
                .tokenizer_config_json(),
            };
            let first_stall = started.elapsed().as_secs_f64();
            let checkpoints = dir.join(preset);
            std::fs::create_dir_all(&checkpoints)?;
            let mut written = PendingWrite::start(checkpoints.clone(), snapshot).finish();
            written.result?;
            let mut snapshot = written
                .snapshot
                .take()
                .context("the writer kept the snapshot")?;
            let started = Instant::now();
            snapshot.refill(&params, &optimizer);
            snapshot.trainer.step = 2;
            let stall = started.elapsed().as_secs_f64();
            let written = PendingWrite::start(checkpoints, snapshot).finish();
            written.result?;
            let mb = (3 * layout.total * 4) as f64 / 1e6;
            println!(
                "{preset:<8} {:>12} {mb:>10.0} {:>14.0} {:>14.0} {:>14.2}",
                layout.total,
                first_stall * 1e3,
                stall * 1e3,
                written.seconds
            );
        }
        Ok(())
    })();
    std::fs::remove_dir_all(dir).ok();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn run_together_waits_for_every_child_and_reports_a_failure() {
        let wall = run_together(vec![shell("sleep 0.2"), shell("true")]).unwrap();
        assert!(
            wall >= 0.2,
            "returned after {wall} s, before the slowest child ended"
        );
        let err = run_together(vec![shell("exit 3"), shell("true")]).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
        let missing = Command::new("/nonexistent/bertrain-bench-child");
        let err = run_together(vec![shell("sleep 5"), missing]).unwrap_err();
        assert!(format!("{err:#}").contains("starting"), "{err:#}");
    }
}
