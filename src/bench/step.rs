//! `bertrain bench step`: where one training step's time goes, on the CPU or a GPU.
//!
//! A step is forward, backward and the optimizer. This times, at the model's own shapes,
//! one feed-forward matrix product (what a tuned step spends most of its time in), the
//! forward pass alone, forward + backward, and the trainer's whole step, each as the mean
//! of `--iters` runs after warm-up runs that leave kernel compilation and autotuning out.
//! Comparing the rows' TFLOP/s says whether a slow step is slow matrix products (the
//! backend's kernels) or time spent between them.

use std::time::Instant;

use anyhow::Result;
use bertrain_coordinator::job::Precision;
use bertrain_model::TrainingBackend;
use bertrain_model::{BertConfig, BertForPreTraining, init_bert};
use bertrain_worker::OnBackend;
use bertrain_worker::Trainer;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::{Optimizer, OptimizerConfig};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::Distribution;

use super::{SEQ_LEN, random_batch};

/// What to measure.
pub struct StepBench {
    pub preset: String,
    pub batches: Vec<usize>,
    pub iters: usize,
    pub precision: Precision,
    /// Dense peak of the device in TFLOP/s, for the MFU column.
    pub peak_tflops: Option<f64>,
    /// Keep the optimizer state on the device, as a GPU worker does (see
    /// the worker's `resident` module); the CPU worker keeps it on the host.
    pub state_on_device: bool,
    /// The device, in the table's title ("cpu", "GPU 0").
    pub label: String,
}

impl OnBackend for &StepBench {
    type Output = ();

    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<()> {
        run::<B>(self, device)
    }
}

/// Runs the benchmark on the backend `B` (with autodiff) on `device`.
fn run<B: TrainingBackend>(bench: &StepBench, device: B::Device) -> Result<()> {
    let label = &bench.label;
    let config = BertConfig::preset(&bench.preset)?;
    println!(
        "bench step: {} ({} parameters), seq {SEQ_LEN}, {:?}, {label}, mean of {} runs after 2 warm-up runs",
        bench.preset,
        config.num_parameters(),
        bench.precision,
        bench.iters
    );
    println!(
        "{:<7} {:<34} {:>10} {:>10} {:>8}",
        "batch", "what", "ms", "TFLOP/s", "MFU"
    );
    for &rows in &bench.batches {
        let batch = random_batch(&config, rows, rows as u64);
        let step_flops = batch.training_flops(&config);
        let row = |what: &str, seconds: f64, flops: f64| {
            let tflops = flops / seconds / 1e12;
            let (tflops, mfu) = match (flops > 0.0, bench.peak_tflops) {
                (false, _) => ("-".to_string(), "-".to_string()),
                (true, None) => (format!("{tflops:.2}"), "-".to_string()),
                (true, Some(peak)) => (
                    format!("{tflops:.2}"),
                    format!("{:.1}%", 100.0 * tflops / peak),
                ),
            };
            println!(
                "{rows:<7} {what:<34} {:>10.2} {tflops:>10} {mfu:>8}",
                seconds * 1e3
            );
        };

        // One feed-forward product: [tokens, hidden] x [hidden, intermediate].
        let tokens = rows * SEQ_LEN;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let a = Tensor::<B::InnerBackend, 2>::random([tokens, h], Distribution::Default, &device);
        let w = Tensor::<B::InnerBackend, 2>::random([h, i], Distribution::Default, &device);
        let seconds = time::<B>(&device, bench.iters, || {
            let _ = a.clone().matmul(w.clone());
            Ok(())
        })?;
        let name = format!("matmul [{tokens}x{h}]x[{h}x{i}]");
        row(&name, seconds, 2.0 * (tokens * h * i) as f64);

        let model: BertForPreTraining<B> = init_bert(&config, 0, &device);
        let inference = model.valid();
        let seconds = time::<B>(&device, bench.iters, || {
            let on_device = batch.to_device::<B::InnerBackend>(&device);
            let _ = inference.forward_unpadded(&on_device, &batch.unpadding);
            Ok(())
        })?;
        row("forward (no autodiff)", seconds, step_flops / 3.0);

        let seconds = time::<B>(&device, bench.iters, || {
            let on_device = batch.to_device::<B>(&device);
            let output = model.forward_unpadded(&on_device, &batch.unpadding);
            let _ = model.loss(&output, &on_device).loss.backward();
            Ok(())
        })?;
        row("forward + backward", seconds, step_flops);

        let optimizer = OptimizerConfig::bert(Optimizer::Adamw, 0.01);
        let mut trainer = Trainer::new(model, optimizer, 1.0, 0, device.clone());
        if bench.state_on_device {
            trainer.keep_on_device()?;
        }
        let mut collective = LocalCollective;
        let micro = std::slice::from_ref(&batch);
        let mut step = 0;
        let mut split = [0.0f64; 2];
        let seconds = time::<B>(&device, bench.iters, || {
            step += 1;
            let stats = trainer.step(step, 0, micro, 1e-4, false, &mut collective)?;
            if step > WARMUP as u64 {
                split[0] += stats.compute_s / bench.iters as f64;
                split[1] += stats.optimizer_s / bench.iters as f64;
            }
            Ok(())
        })?;
        row("trainer step", seconds, step_flops);
        row("  of which forward+backward+loss", split[0], step_flops);
        row("  of which clip+AdamW (queued)", split[1], 0.0);
    }
    Ok(())
}

const WARMUP: usize = 2;

/// Mean seconds of `f` over `iters` runs after [`WARMUP`] runs, the device drained before
/// and after (its work is asynchronous).
fn time<B: Backend>(
    device: &B::Device,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("waiting for the device: {e:?}"));
    for _ in 0..WARMUP {
        f()?;
    }
    sync()?;
    let started = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync()?;
    Ok(started.elapsed().as_secs_f64() / iters.max(1) as f64)
}
