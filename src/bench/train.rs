//! `bench train`: one training step of the demo's model or a dataset, with 1 or more ranks, padded against unpadded.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_dataprep::{Instance, Manifest};
use bertrain_model::init::SplitMix64;
use bertrain_model::{BertConfig, init_bert};
use bertrain_worker::CpuBackend;
use bertrain_worker::HostBatch;
use bertrain_worker::Trainer;
use bertrain_worker::collective::{Collective, LocalCollective, RingListener, RingOptions};
use bertrain_worker::{BatchShape, SampleSource, step_data};
use bertrain_worker::{Optimizer, OptimizerConfig};

use super::{ISSUE_REFERENCE, SEQ_LEN, bench_batch_size};

pub(super) fn bench_train(
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
        "training step, seq {SEQ_LEN}, {} predictions/seq, AdamW, fp32, CPU (Flex), {workers} worker process(es); HF torch: {}",
        predictions_per_seq(SEQ_LEN),
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
pub(super) fn run_ranks(
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
pub(super) fn hf_reference(
    python: &Path,
    presets: &str,
    steps: usize,
    threads: usize,
) -> Result<String> {
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
pub(super) fn train_rank(
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
        let local = std::slice::from_ref(&random_batch(
            &config,
            batch_size / world,
            SEQ_LEN,
            1 + rank as u64,
        ))
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
pub(super) fn rank_collective(
    world: usize,
    rank: usize,
    peers: &str,
) -> Result<Box<dyn Collective>> {
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
pub(super) fn dataset_rank(
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
        if !batch_size.is_multiple_of(world) {
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

/// Masked positions per sequence of `seq` tokens: 15%, rounded up (20 at 128).
fn predictions_per_seq(seq: usize) -> usize {
    (seq * 15).div_ceil(100)
}

/// `rows` full-length instances of `seq` random tokens with [`predictions_per_seq`] masked.
pub fn random_batch(config: &BertConfig, rows: usize, seq: usize, seed: u64) -> HostBatch {
    let mut rng = SplitMix64::new(seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as u32;
    let predictions = predictions_per_seq(seq);
    let spacing = (seq - 2) / predictions;
    let instances: Vec<Instance> = (0..rows)
        .map(|_| {
            let input_ids: Vec<u32> = (0..seq)
                .map(|_| 999 + below(config.vocab_size - 999))
                .collect();
            let token_type_ids = (0..seq).map(|i| u8::from(i >= seq / 2)).collect();
            let masked_lm_positions: Vec<u32> =
                (0..predictions).map(|k| 1 + (k * spacing) as u32).collect();
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
