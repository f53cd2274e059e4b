//! `bertrain bench step`: where one training step's time goes, on the CPU or a GPU.
//!
//! For each model and sequence length, at the same tokens per step, it times:
//! - the trainer's whole step (forward, backward, all-reduce, clipping and AdamW);
//! - forward + backward with the loss;
//! - the dense layers alone: every dense op of the step (Q/K/V, attention output,
//!   intermediate with GELU, output, MLM transform and decoder) forward and backward at
//!   the step's shapes, on random inputs: products, bias and GELU with their gradients;
//! - attention alone: the model's own [`attention`] (scores, mask, softmax, dropout,
//!   context) forward and backward at the step's shapes, once per layer.
//!
//! The rest of forward + backward ("other": embeddings, LayerNorms, dropout, residuals,
//! the gathers of the unpadded encoder, the heads' losses) is the difference, and so is
//! the optimizer: the step less forward + backward and the all-reduce. Each time is the
//! mean of `--iters` rounds after warm-up rounds that leave kernel compilation and
//! autotuning out; a round runs each part once, the device drained before and after.
//! Parts timed alone may run a little faster or slower than inside the step, so a
//! difference can come out slightly negative: the split says where to look.

use std::time::Instant;

use anyhow::{Result, bail};
use bertrain_coordinator::job::Precision;
use bertrain_model::TrainingBackend;
use bertrain_model::bert::{attention, padded_vocab};
use bertrain_model::dense::Activation;
use bertrain_model::{BertConfig, BertForPreTraining, DenseOps, init_bert};
use bertrain_worker::OnBackend;
use bertrain_worker::Trainer;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::{Optimizer, OptimizerConfig};
use burn::nn::DropoutConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::ops::FloatTensor;

use super::random_batch;

/// What to measure.
pub struct StepBench {
    pub presets: Vec<String>,
    pub seq_lens: Vec<usize>,
    /// Tokens per step: each sequence length runs `tokens / seq` sequences.
    pub tokens: usize,
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

impl StepBench {
    /// Refuses shapes the models cannot run, before anything is built.
    pub fn check(&self) -> Result<()> {
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        for preset in &self.presets {
            let config = BertConfig::preset(preset)?;
            for &seq in &self.seq_lens {
                if seq < 8 || seq > config.max_position_embeddings {
                    bail!(
                        "--seq {seq}: {preset} takes sequences of 8 to {} tokens",
                        config.max_position_embeddings
                    );
                }
                if self.tokens < seq || !self.tokens.is_multiple_of(seq) {
                    bail!(
                        "--tokens {}: must be a multiple of every --seq (here {seq})",
                        self.tokens
                    );
                }
            }
        }
        Ok(())
    }
}

impl OnBackend for &StepBench {
    type Output = ();

    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<()> {
        run::<B>(self, device)
    }
}

/// One table row: milliseconds of each part.
struct Split {
    step: f64,
    forward_backward: f64,
    dense: f64,
    attention: f64,
    all_reduce: f64,
}

/// Runs the benchmark on the backend `B` (with autodiff) on `device`.
fn run<B: TrainingBackend>(bench: &StepBench, device: B::Device) -> Result<()> {
    println!(
        "bench step: {} tokens per step, {:?}, {}, mean of {} rounds after {WARMUP} warm-up rounds{}",
        bench.tokens,
        bench.precision,
        bench.label,
        bench.iters,
        match bench.peak_tflops {
            Some(peak) => format!("; MFU against {peak:.1} TFLOP/s"),
            None => String::new(),
        }
    );
    println!(
        "| model | seq | batch | step ms | tokens/s | TFLOP/s | MFU | dense ms | dense TFLOP/s | attention ms | attention TFLOP/s | other ms | optimizer ms | all-reduce ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for preset in &bench.presets {
        let config = BertConfig::preset(preset)?;
        for &seq in &bench.seq_lens {
            let rows = bench.tokens / seq;
            let batch = random_batch(&config, rows, seq, rows as u64);
            let predictions = batch.masked_positions.len();
            let split = measure::<B>(bench, &config, &batch, &device)?;
            let step_flops = batch.training_flops(&config);
            let dense_flops = dense_shapes::<B>(&config, bench.tokens, predictions, &device)
                .iter()
                .map(|s| 6.0 * (s.rows * s.d_in * s.d_out * s.count) as f64)
                .sum::<f64>();
            let attention_flops = (config.num_hidden_layers * 12 * rows * seq * seq) as f64
                * config.hidden_size as f64;
            let tflops = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
            let mfu = match bench.peak_tflops {
                Some(peak) => format!("{:.1}%", 100.0 * tflops(step_flops, split.step) / peak),
                None => "-".into(),
            };
            println!(
                "| {preset} | {seq} | {rows} | {:.2} | {:.0} | {:.2} | {mfu} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                split.step,
                bench.tokens as f64 / (split.step * 1e-3),
                tflops(step_flops, split.step),
                split.dense,
                tflops(dense_flops, split.dense),
                split.attention,
                tflops(attention_flops, split.attention),
                split.forward_backward - split.dense - split.attention,
                split.step - split.forward_backward - split.all_reduce,
                split.all_reduce,
            );
        }
    }
    Ok(())
}

/// Times the four parts in turn, once each per round, so that a machine whose speed drifts
/// (a shared CPU, a GPU warming up) weighs on all of them alike.
fn measure<B: TrainingBackend>(
    bench: &StepBench,
    config: &BertConfig,
    batch: &bertrain_worker::HostBatch,
    device: &B::Device,
) -> Result<Split> {
    let mut dense = dense_layers::<B::InnerBackend>(config, batch, device);
    let mut attention = attention_layers::<B>(config, batch, device);
    let model: BertForPreTraining<B> = init_bert(config, 0, device);
    let mut forward_backward = {
        let model = model.clone();
        move || -> Result<()> {
            let on_device = batch.to_device::<B>(device);
            let output = model.forward_unpadded(&on_device, &batch.unpadding);
            let _ = model.loss(&output, &on_device).loss.backward();
            Ok(())
        }
    };
    let optimizer = OptimizerConfig::bert(Optimizer::Adamw, 0.01);
    let mut trainer = Trainer::new(model, optimizer, 1.0, 0, device.clone());
    if bench.state_on_device {
        trainer.keep_on_device()?;
    }
    let mut collective = LocalCollective;
    let micro = std::slice::from_ref(batch);
    let mut step = 0;
    let all_reduce = std::cell::Cell::new(0.0);
    let mut trainer_step = || -> Result<()> {
        step += 1;
        let stats = trainer.step(step, 0, micro, 1e-4, false, &mut collective)?;
        all_reduce.set(stats.comm_s);
        Ok(())
    };

    let mut split = Split {
        step: 0.0,
        forward_backward: 0.0,
        dense: 0.0,
        attention: 0.0,
        all_reduce: 0.0,
    };
    for round in 0..WARMUP + bench.iters {
        let measured = round >= WARMUP;
        let add = |total: &mut f64, seconds: f64| {
            if measured {
                *total += seconds * 1e3 / bench.iters as f64;
            }
        };
        add(&mut split.dense, time::<B>(device, &mut dense)?);
        add(&mut split.attention, time::<B>(device, &mut attention)?);
        add(
            &mut split.forward_backward,
            time::<B>(device, &mut forward_backward)?,
        );
        add(&mut split.step, time::<B>(device, &mut trainer_step)?);
        add(&mut split.all_reduce, all_reduce.get());
    }
    Ok(split)
}

/// One dense layer's shape in a step, `count` times.
struct DenseShape {
    rows: usize,
    d_in: usize,
    d_out: usize,
    act: Activation,
    count: usize,
    /// The weight is a transposed `[out, in]` matrix: the tied decoder's, where the
    /// vocabulary is not padded (padding copies it).
    weight_transposed: bool,
}

/// The dense ops of one training step over `tokens` tokens with `predictions` masked
/// positions, as the model runs them (the decoder over its padded vocabulary).
fn dense_shapes<B: Backend>(
    config: &BertConfig,
    tokens: usize,
    predictions: usize,
    device: &B::Device,
) -> [DenseShape; 6] {
    let (h, i, layers) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
    );
    let shape = |rows, d_in, d_out, act, count| DenseShape {
        rows,
        d_in,
        d_out,
        act,
        count,
        weight_transposed: false,
    };
    let vocab = padded_vocab::<B>(config.vocab_size, device);
    [
        shape(tokens, h, 3 * h, Activation::Identity, layers),
        shape(tokens, h, h, Activation::Identity, layers),
        shape(tokens, h, i, Activation::GeluErf, layers),
        shape(tokens, i, h, Activation::Identity, layers),
        shape(predictions, h, h, Activation::GeluErf, 1),
        DenseShape {
            weight_transposed: vocab == config.vocab_size,
            ..shape(predictions, h, vocab, Activation::Identity, 1)
        },
    ]
}

/// Every dense op of a step, forward and backward, through the backend's dense op.
fn dense_layers<'a, B: DenseOps>(
    config: &BertConfig,
    batch: &bertrain_worker::HostBatch,
    device: &'a B::Device,
) -> impl FnMut() -> Result<()> + 'a {
    // At the model's scales: inputs normalised, weights as BERT initialises them. (Larger
    // pre-activations make the erf GELU underflow into subnormals, which are slow on a CPU.)
    let random = |shape: [usize; 2], std: f64| -> FloatTensor<B> {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, std), device)
            .into_primitive()
            .tensor()
    };
    let predictions = batch.masked_positions.len();
    let inputs: Vec<_> = dense_shapes::<B>(config, batch.tokens, predictions, device)
        .into_iter()
        .map(|s| {
            let bias = Tensor::<B, 1>::zeros([s.d_out], device)
                .into_primitive()
                .tensor();
            let upstream = random([s.rows, s.d_out], 1.0);
            let weight = if s.weight_transposed {
                B::float_transpose(random([s.d_out, s.d_in], 0.02))
            } else {
                random([s.d_in, s.d_out], 0.02)
            };
            (random([s.rows, s.d_in], 1.0), weight, bias, upstream, s)
        })
        .collect();
    move || {
        for (x, w, b, dy, s) in &inputs {
            for _ in 0..s.count {
                let (_, pre) = B::dense_forward(x.clone(), w.clone(), b.clone(), s.act);
                let _ = B::dense_backward(x.clone(), w.clone(), pre, dy.clone(), s.act);
            }
        }
        Ok(())
    }
}

/// Every layer's attention of a step, forward and backward (autodiff), with the model's
/// attention dropout, over full-length sequences.
fn attention_layers<'a, B: TrainingBackend>(
    config: &'a BertConfig,
    batch: &bertrain_worker::HostBatch,
    device: &'a B::Device,
) -> impl FnMut() -> Result<()> + 'a {
    let (rows, seq) = (batch.rows, batch.seq_len);
    let heads = config.num_attention_heads;
    let shape = [rows, heads, seq, config.hidden_size / heads];
    let random =
        || Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad();
    let (query, key, value) = (random(), random(), random());
    let score_bias = Tensor::<B, 4>::zeros([rows, 1, 1, seq], device);
    let dropout = DropoutConfig::new(config.attention_probs_dropout_prob).init();
    let keys = bertrain_model::dropout::RowKeys::grid(0, seq);
    move || {
        for _ in 0..config.num_hidden_layers {
            let context = attention(
                query.clone(),
                key.clone(),
                value.clone(),
                score_bias.clone(),
                &dropout,
                &keys,
            );
            let _ = context.backward();
        }
        Ok(())
    }
}

/// Rounds run before the measured ones (kernel compilation, autotuning, caches).
const WARMUP: usize = 2;

/// Seconds of one run of `f`, the device drained before and after (its work is
/// asynchronous).
fn time<B: Backend>(device: &B::Device, f: &mut impl FnMut() -> Result<()>) -> Result<f64> {
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("waiting for the device: {e:?}"));
    sync()?;
    let started = Instant::now();
    f()?;
    sync()?;
    Ok(started.elapsed().as_secs_f64())
}
