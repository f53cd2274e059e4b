//! `bench scaling`: the demo's job (tiny BERT, synthetic corpus) run for real by
//! `bertrain launch` with 1 and then 2 worker processes at the same global batch, each
//! three ways: the padded encoder without length bins (`BERTRAIN_FORWARD=padded`, for
//! this comparison only: how training ran before the unpadded encoder), the unpadded
//! encoder without bins, and the demo's job as it is (unpadded, with bins); and where
//! each step's time goes, read back from the job's own `metrics.jsonl`: computing
//! (forward, backward, optimizer), communicating (the gradient all-reduce) and waiting
//! for the data loader.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::demo::{demo_job_settings, synthetic_dataset, write_demo_job};

/// The demo job's global batch, split over the workers.
const GLOBAL_BATCH: usize = 32;
/// Steps left out of the averages: the first steps allocate and fill the loader.
const WARMUP_STEPS: usize = 5;

/// Runs the table in `dir` (an empty working directory).
pub fn bench_scaling(dir: &Path, workers: &[u32], steps: usize) -> Result<()> {
    if steps <= WARMUP_STEPS {
        bail!("--steps must be more than {WARMUP_STEPS} (the warm-up steps left out)");
    }
    if let Some(w) = workers
        .iter()
        .find(|&&w| w == 0 || !GLOBAL_BATCH.is_multiple_of(w as usize))
    {
        bail!("--workers {w}: each count must divide the global batch of {GLOBAL_BATCH}");
    }
    println!("preparing the demo's dataset (synthetic corpus, 2000 documents) ...");
    let data = synthetic_dataset(dir, 2000, 0)?;
    let job = write_demo_job(dir)?;
    println!(
        "the demo's job (tiny BERT, seq <= 128, global batch {GLOBAL_BATCH}), {steps} steps, \
         means over steps {}..{steps}; times in ms per step",
        WARMUP_STEPS + 1
    );
    println!(
        "{:>7} {:>11} {:>15} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "workers",
        "micro-batch",
        "encoder",
        "tokens/s",
        "vs padded",
        "speedup",
        "step",
        "compute",
        "comm",
        "data wait",
        "padding"
    );
    let mut baseline = None;
    for &n in workers {
        let mut padded_tokens_per_s = None;
        for (encoder, padded, bins) in [
            ("padded", true, false),
            ("unpadded", false, false),
            ("unpadded + bins", false, true),
        ] {
            let run = dir.join(format!("run-{n}-{}", encoder.replace(" + ", "-")));
            launch(&job, &run, &data, n, steps, padded, bins)?;
            let m = StepMeans::read(&run.join("metrics.jsonl"), WARMUP_STEPS)?;
            let baseline = *baseline.get_or_insert(m.tokens_per_s);
            let same_workers = *padded_tokens_per_s.get_or_insert(m.tokens_per_s);
            let ms = |s: f64| format!("{:.1}", s * 1e3);
            println!(
                "{n:>7} {:>11} {encoder:>15} {:>10.0} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7.1}%",
                GLOBAL_BATCH / n as usize,
                m.tokens_per_s,
                format!("{:.2}x", m.tokens_per_s / same_workers),
                format!("{:.2}x", m.tokens_per_s / baseline),
                ms(m.step_s),
                ms(m.step_s - m.comm_s - m.data_wait_s),
                ms(m.comm_s),
                ms(m.data_wait_s),
                m.padding * 100.0,
            );
        }
    }
    Ok(())
}

/// Runs `bertrain launch` on the demo job with `workers` processes, its output in
/// `run/launch.log` (shown only if it fails).
fn launch(
    job: &Path,
    run: &Path,
    data: &Path,
    workers: u32,
    steps: usize,
    padded: bool,
    length_bins: bool,
) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut settings = demo_job_settings(run, data, 0, workers);
    settings.extend([
        format!("train.micro_batch_size={}", GLOBAL_BATCH / workers as usize),
        format!("train.max_steps={steps}"),
        format!("cluster.coordinator=127.0.0.1:{port}"),
        format!("data.length_bins={length_bins}"),
        // Nothing but steps inside the measured window: one checkpoint and one
        // evaluation, both at the end.
        "checkpoint.every_steps=0".into(),
        "eval.every_steps=0".into(),
    ]);
    fs::create_dir_all(run)?;
    let log_path = run.join("launch.log");
    let log = fs::File::create(&log_path)?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("launch").arg("--config").arg(job);
    if padded {
        command.env(bertrain_worker::PADDED_FORWARD_ENV, "padded");
    }
    for s in &settings {
        command.args(["--set", s]);
    }
    let status = command
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .context("starting bertrain launch")?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
        bail!("the run with {workers} worker(s) failed ({status})");
    }
    Ok(())
}

/// Means of the per-step records of a `metrics.jsonl` after the first `skip` steps.
struct StepMeans {
    tokens_per_s: f64,
    step_s: f64,
    comm_s: f64,
    data_wait_s: f64,
    padding: f64,
}

impl StepMeans {
    fn read(path: &Path, skip: usize) -> Result<StepMeans> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let steps: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v.get("split").is_none())
            .skip(skip)
            .collect();
        if steps.is_empty() {
            bail!("{} has no steps after the first {skip}", path.display());
        }
        let mean = |key: &str| {
            steps
                .iter()
                .map(|v| v[key].as_f64().unwrap_or(f64::NAN))
                .sum::<f64>()
                / steps.len() as f64
        };
        Ok(StepMeans {
            tokens_per_s: mean("tokens_per_s"),
            step_s: mean("step_time_s"),
            comm_s: mean("comm_s"),
            data_wait_s: mean("data_wait_s"),
            padding: mean("padding_fraction"),
        })
    }
}
