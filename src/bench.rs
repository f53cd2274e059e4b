//! `bertrain bench`: performance figures as tables (never timed tests).
//!
//! `bench dataprep` runs `bertrain dataprep` as child processes on a generated corpus of the
//! size of the reference measurement (3.5 MB, 472 documents) and reports wall time per
//! thread count, and peak memory (the child's max RSS) at 1x and 10x the corpus.
//!
//! `bench train` measures one full training step (forward + backward + all-reduce +
//! AdamW) in tokens/s at sequence length 128, beside the figures of HF transformers
//! `BertForPreTraining` on torch 2.15 measured on the same 2-core machine (fp32, 2
//! threads, batch 32, or 8 for base, seq 128, AdamW).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_dataprep::Instance;
use bertrain_model::init::SplitMix64;
use bertrain_model::{BertConfig, init_bert};
use bertrain_worker::CpuBackend;
use bertrain_worker::batch::HostBatch;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::optim::{OptimizerConfig, OptimizerKind};
use bertrain_worker::trainer::Trainer;

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
    },
    /// Training-step throughput of model presets on the CPU.
    Train {
        /// Comma-separated presets.
        #[arg(long, default_value = "tiny,mini,base")]
        presets: String,
        /// Measured steps per preset (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

/// (preset, batch size, HF transformers tokens/s on this machine).
const REFERENCE: &[(&str, usize, f64)] = &[
    ("tiny", 32, 3262.0),
    ("mini", 32, 1949.0),
    ("base", 8, 284.0),
];

const SEQ_LEN: usize = 128;
const PREDICTIONS: usize = 20;

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchKind::Train { presets, steps } => bench_train(&presets, steps),
        BenchKind::Dataprep { work_dir, threads } => bench_dataprep(&work_dir, &threads),
    }
}

fn bench_train(presets: &str, steps: usize) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    println!(
        "training step, seq {SEQ_LEN}, {PREDICTIONS} predictions/seq, AdamW, fp32, CPU (Flex)"
    );
    println!(
        "{:<8} {:>6} {:>10} {:>12} {:>14} {:>10}",
        "model", "batch", "s/step", "tokens/s", "HF torch tok/s", "ratio"
    );
    for preset in presets.split(',').map(str::trim) {
        let config = BertConfig::preset(preset)?;
        let (batch_size, reference) = REFERENCE
            .iter()
            .find(|r| r.0 == preset)
            .map(|r| (r.1, Some(r.2)))
            .unwrap_or((32, None));
        let device = Default::default();
        let model = init_bert::<CpuBackend>(&config, 0, &device);
        let optimizer = OptimizerConfig::bert(OptimizerKind::AdamW, 0.01);
        let mut trainer = Trainer::new(model, optimizer, 1.0, 0, device);
        let batch = random_batch(&config, batch_size, 1);
        let mut collective = LocalCollective;
        trainer.step(
            0,
            0,
            std::slice::from_ref(&batch),
            1e-4,
            false,
            &mut collective,
        )?;
        let started = Instant::now();
        for step in 1..=steps as u64 {
            trainer.step(
                step,
                0,
                std::slice::from_ref(&batch),
                1e-4,
                false,
                &mut collective,
            )?;
        }
        let per_step = started.elapsed().as_secs_f64() / steps as f64;
        let tokens_per_s = (batch_size * SEQ_LEN) as f64 / per_step;
        let (reference, ratio) = match reference {
            Some(r) => (format!("{r:.0}"), format!("{:.2}x", tokens_per_s / r)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{preset:<8} {batch_size:>6} {per_step:>10.3} {tokens_per_s:>12.0} {reference:>14} {ratio:>10}"
        );
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

fn bench_dataprep(work_dir: &Path, threads: &str) -> Result<()> {
    let threads: Vec<usize> = threads
        .split(',')
        .map(|t| {
            t.trim()
                .parse()
                .with_context(|| format!("--threads: {t:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    if work_dir.exists() {
        bail!(
            "{} exists; choose another --work-dir (the benchmark removes it when done)",
            work_dir.display()
        );
    }
    std::fs::create_dir_all(work_dir)?;
    let result = dataprep_table(work_dir, &threads);
    std::fs::remove_dir_all(work_dir).ok();
    result
}

fn dataprep_table(dir: &Path, threads: &[usize]) -> Result<()> {
    let exe = std::env::current_exe()?;
    // Long documents (100-180 sentences): 472 of them make the reference's 3.5 MB.
    let corpus = |name: &str, docs: usize| -> Result<PathBuf> {
        let path = dir.join(name);
        let options = bertrain_dataprep::SynthOptions {
            docs,
            seed: 1,
            min_sentences: 100,
            max_sentences: 180,
        };
        let text: Vec<String> = bertrain_dataprep::synth_corpus_with(options).collect();
        std::fs::write(&path, text.join("\n\n") + "\n")?;
        Ok(path)
    };
    let small = corpus("corpus-1x.txt", DATAPREP_DOCS)?;
    let large = corpus("corpus-10x.txt", 10 * DATAPREP_DOCS)?;
    let vocab = dir.join("vocab.txt");
    let (status, _, _) = run_measured(
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
        "{:<10} {:>8} {:>8} {:>9} {:>10} {:>12} {:>10}",
        "corpus", "MB", "threads", "wall s", "MB/s", "vs Python", "peak MB"
    );
    let mut peaks = Vec::new();
    for (name, path, thread_counts) in [
        ("1x", &small, threads.to_vec()),
        ("10x", &large, vec![*threads.last().unwrap_or(&2)]),
    ] {
        for t in thread_counts {
            let out = dir.join(format!("out-{name}-{t}"));
            let (ok, wall, peak) = run_measured(
                Command::new(&exe)
                    .args([
                        "dataprep",
                        "--quiet",
                        "--dupe-factor",
                        "5",
                        "--max-seq-len",
                        "128",
                        "--threads",
                    ])
                    .arg(t.to_string())
                    .arg("--input")
                    .arg(path)
                    .arg("--vocab")
                    .arg(&vocab)
                    .arg("--output")
                    .arg(&out),
            )?;
            if !ok {
                bail!("dataprep on the {name} corpus failed");
            }
            let size = mb(path)?;
            let speedup = if name == "1x" {
                format!("{:.0}x", DATAPREP_REFERENCE_S / wall)
            } else {
                "-".into()
            };
            println!(
                "{name:<10} {size:>8.1} {t:>8} {wall:>9.3} {:>10.1} {speedup:>12} {peak:>10.0}",
                size / wall
            );
            peaks.push((name, t, peak));
            std::fs::remove_dir_all(&out).ok();
        }
    }
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

/// Runs a child to its end: (success, wall seconds, peak resident memory in MB).
fn run_measured(command: &mut Command) -> Result<(bool, f64, f64)> {
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
    // ru_maxrss is in KiB on Linux.
    Ok((ok, wall, usage.ru_maxrss as f64 * 1024.0 / 1e6))
}
