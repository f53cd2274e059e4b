//! The fine-tuning loop, written once for every backend ([`OnBackend`]): shuffled batches,
//! forward and backward, gradient clipping, AdamW with warmup and linear decay on flat
//! buffers (the worker's optimizer and schedule; on the host for the CPU, on the device
//! for a GPU), evaluation after every epoch,
//! `metrics.jsonl`, and the fine-tuned model as an HF directory.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bertrain_coordinator::job::Decay;
use bertrain_model::classifier::classifier_config_json;
use bertrain_model::hf::{self, TOKENIZER_CONFIG_FILE};
use bertrain_model::init::{SplitMix64, init_slot};
use bertrain_model::params::{Accumulation, accumulate_grads, load_flat_params};
use bertrain_model::{BertConfig, BertForSequenceClassification, ParamLayout, seed_dropout};
use bertrain_model::{DenseOps, TrainingBackend};
use bertrain_worker::LrSchedule;
use bertrain_worker::optim::{self, Optimizer, OptimizerConfig, OptimizerState};
use bertrain_worker::{DeviceMaster, OnBackend};
use burn::module::AutodiffModule;
use burn::prelude::*;

use crate::FinetuneArgs;
use crate::data::{self, Feature};
use crate::input::{LabelSpace, Target};
use crate::metrics::{self, Metric};

/// HF `Trainer`'s default, and what BERT's pretraining uses here too.
const MAX_GRAD_NORM: f32 = 1.0;
pub(crate) const METRICS_FILE: &str = "metrics.jsonl";

/// Everything a run needs, checked and tokenised.
pub(crate) struct Job {
    pub config: BertConfig,
    /// The classifier's starting parameters, flat in its layout.
    pub initial: Vec<f32>,
    pub labels: LabelSpace,
    pub metric: Metric,
    pub train: Vec<Feature>,
    pub validation: Vec<Feature>,
    pub vocab_path: PathBuf,
    pub tokenizer_config: String,
    pub args: FinetuneArgs,
    /// Keep the master parameters and optimizer state on the device (`--backend cuda`).
    pub optimizer_on_device: bool,
}

/// A run's figures.
#[derive(Debug, Clone)]
pub struct Summary {
    pub metric: Metric,
    /// The metric on the validation set after the last epoch.
    pub value: f64,
    /// Training time (evaluations excluded) and real tokens per second in it.
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub wall_seconds: f64,
    pub output: PathBuf,
}

/// BERT's initialisation of every parameter of `layout` from `seed` (the from-scratch
/// baseline).
pub(crate) fn random_weights(layout: &ParamLayout, config: &BertConfig, seed: u64) -> Vec<f32> {
    let mut flat = vec![0.0; layout.total];
    for (index, slot) in layout.slots.iter().enumerate() {
        let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        init_slot(slot, config.initializer_range as f32, &mut rng, &mut flat);
    }
    flat
}

/// One epoch's line of `metrics.jsonl` and of the final table.
struct EpochRecord {
    epoch: u32,
    step: u64,
    train_loss: f64,
    metrics: Vec<(Metric, f64)>,
    seconds: f64,
}

impl OnBackend for Job {
    type Output = Summary;

    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<Summary> {
        let started = Instant::now();
        let args = &self.args;
        let outputs = self.labels.outputs();
        let mut model = BertForSequenceClassification::<B>::new(&self.config, outputs, &device);
        let layout = ParamLayout::of(&model);
        let mut params = self.initial.clone();
        model = load_flat_params(model, &params, &layout);

        let steps_per_epoch = self.train.len().div_ceil(args.batch_size) as u64;
        let total_steps = steps_per_epoch * u64::from(args.epochs);
        let schedule = LrSchedule {
            peak: args.lr,
            warmup_steps: (args.warmup_ratio * total_steps as f64).round() as u64,
            max_steps: total_steps,
            decay: Decay::Linear,
            poly_power: 1.0,
        };
        let optimizer = OptimizerConfig::bert(Optimizer::Adamw, args.weight_decay as f32);
        let mut state = OptimizerState::new(layout.total);
        let mut grads = vec![0.0f32; layout.total];
        // On a GPU the master parameters and AdamW's moments stay there, as in pretraining.
        let mut on_device = match self.optimizer_on_device {
            true => Some(DeviceMaster::<B::InnerBackend>::upload(
                &optimizer, &layout, &params, &state, &device,
            )?),
            false => None,
        };

        fs::create_dir_all(&args.output)
            .with_context(|| format!("cannot create {}", args.output.display()))?;
        let metrics_path = args.output.join(METRICS_FILE);
        let mut metrics_file = fs::File::create(&metrics_path)
            .with_context(|| format!("cannot create {}", metrics_path.display()))?;
        tracing::info!(
            "fine-tuning on {} examples ({} validation), {} epochs of {steps_per_epoch} steps, {} outputs{}",
            self.train.len(),
            self.validation.len(),
            args.epochs,
            outputs,
            if args.from_scratch {
                ", from random weights"
            } else {
                ""
            }
        );

        let mut progress = Progress::new(!args.quiet, total_steps);
        let mut records = Vec::new();
        let mut step = 0u64;
        let mut train_time = Duration::ZERO;
        let mut train_tokens = 0usize;
        for epoch in 1..=args.epochs {
            let order = shuffled(self.train.len(), args.seed, epoch);
            let (mut loss_sum, mut loss_count) = (0.0f64, 0usize);
            let epoch_started = Instant::now();
            for chunk in order.chunks(args.batch_size) {
                let step_started = Instant::now();
                let features: Vec<&Feature> = chunk.iter().map(|&i| &self.train[i]).collect();
                let batch = data::batch::<B>(&features, &device);
                // Dropout masks are a function of (seed, step): a rerun repeats them.
                seed_dropout(args.seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ step, 0);
                let logits = model.forward(&batch.inputs, &batch.unpadding);
                let loss = model.loss(logits, &batch.targets);
                let gradients = loss.backward();
                let loss_value: f32 = loss.into_scalar().elem();
                let lr = schedule.at(step) as f32;
                match &mut on_device {
                    Some(master) => {
                        master.accumulate(&model, &gradients, &layout, Accumulation::Overwrite);
                        master.clip(MAX_GRAD_NORM);
                        master.adamw(&optimizer, &mut state, lr);
                        model = master.write_into(model, &layout);
                    }
                    None => {
                        accumulate_grads(
                            &model,
                            &gradients,
                            &layout,
                            &mut grads,
                            Accumulation::Overwrite,
                        );
                        optim::clip_grad_norm(&mut grads, MAX_GRAD_NORM);
                        optim::update(&optimizer, &layout, &mut state, &mut params, &grads, lr);
                        model = load_flat_params(model, &params, &layout);
                    }
                }
                step += 1;
                train_time += step_started.elapsed();
                train_tokens += batch.tokens;
                loss_sum += f64::from(loss_value) * features.len() as f64;
                loss_count += features.len();
                progress.update(
                    step,
                    epoch,
                    f64::from(loss_value),
                    train_tokens as f64 / train_time.as_secs_f64().max(1e-9),
                );
            }
            let metrics = self.evaluate(&model.valid(), &device);
            let record = EpochRecord {
                epoch,
                step,
                train_loss: loss_sum / loss_count.max(1) as f64,
                metrics,
                seconds: epoch_started.elapsed().as_secs_f64(),
            };
            let mut line = serde_json::json!({
                "epoch": record.epoch,
                "step": record.step,
                "train_loss": record.train_loss,
                "lr": schedule.at(step.saturating_sub(1)),
                "seconds": record.seconds,
                "tokens_per_s": train_tokens as f64 / train_time.as_secs_f64().max(1e-9),
                "split": "validation",
            });
            for (m, v) in &record.metrics {
                line[m.name()] = (*v).into();
            }
            writeln!(metrics_file, "{line}")
                .with_context(|| format!("writing {}", metrics_path.display()))?;
            progress.epoch_done(&record, self.metric);
            records.push(record);
        }
        progress.finish();
        if let Some(master) = &on_device {
            master.download(&mut params, &mut state);
        }

        let names = match &self.labels {
            LabelSpace::Classes { names, .. } => names.clone(),
            LabelSpace::Regression => Vec::new(),
        };
        let regression = self.labels == LabelSpace::Regression;
        hf::save_dir_with_config(
            &args.output,
            &self.config,
            &classifier_config_json(&self.config, &names, regression),
            &layout,
            &params,
            Some(&self.vocab_path),
        )?;
        bertrain_files::write_atomically(
            &args.output.join(TOKENIZER_CONFIG_FILE),
            self.tokenizer_config.as_bytes(),
        )?;

        let last = records.last().expect("at least one epoch");
        let value = last
            .metrics
            .iter()
            .find(|(m, _)| *m == self.metric)
            .map(|(_, v)| *v)
            .expect("the task's metric is computed");
        let summary = Summary {
            metric: self.metric,
            value,
            train_seconds: train_time.as_secs_f64(),
            tokens_per_s: train_tokens as f64 / train_time.as_secs_f64().max(1e-9),
            wall_seconds: started.elapsed().as_secs_f64(),
            output: args.output.clone(),
        };
        let final_line = serde_json::json!({
            "final": true,
            "metric": self.metric.name(),
            "value": value,
            "epochs": args.epochs,
            "steps": step,
            "train_seconds": summary.train_seconds,
            "tokens_per_s": summary.tokens_per_s,
            "wall_seconds": summary.wall_seconds,
            "from_scratch": args.from_scratch,
        });
        writeln!(metrics_file, "{final_line}")
            .with_context(|| format!("writing {}", metrics_path.display()))?;
        print_table(&records, &summary);
        Ok(summary)
    }
}

impl Job {
    /// The validation metrics of `model` (no dropout, no autodiff).
    fn evaluate<B: DenseOps>(
        &self,
        model: &BertForSequenceClassification<B>,
        device: &B::Device,
    ) -> Vec<(Metric, f64)> {
        let outputs = self.labels.outputs();
        let mut predicted_classes = Vec::new();
        let mut predicted_values = Vec::new();
        let features: Vec<&Feature> = self.validation.iter().collect();
        for chunk in features.chunks(self.args.batch_size) {
            let batch = data::batch::<B>(chunk, device);
            let logits: Vec<f32> = model
                .forward(&batch.inputs, &batch.unpadding)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 logits");
            for row in logits.chunks(outputs) {
                // The first of equal maxima, as torch's argmax.
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
                predicted_classes.push(best);
                predicted_values.push(f64::from(row[0]));
            }
        }
        match &self.labels {
            LabelSpace::Regression => {
                let targets: Vec<f64> = self
                    .validation
                    .iter()
                    .map(|f| match f.target {
                        Target::Value(v) => f64::from(v),
                        Target::Class(c) => c as f64,
                    })
                    .collect();
                metrics::regression(&predicted_values, &targets)
            }
            LabelSpace::Classes { .. } => {
                let labels: Vec<usize> = self
                    .validation
                    .iter()
                    .map(|f| match f.target {
                        Target::Class(c) => c,
                        Target::Value(v) => v as usize,
                    })
                    .collect();
                metrics::classification(&predicted_classes, &labels, outputs)
            }
        }
    }
}

/// The example order of `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
fn shuffled(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ u64::from(epoch).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn print_table(records: &[EpochRecord], summary: &Summary) {
    let names: Vec<&str> = records[0].metrics.iter().map(|(m, _)| m.name()).collect();
    let mut header = format!("{:>5} {:>6} {:>10}", "epoch", "step", "train loss");
    for name in &names {
        header += &format!(" {name:>9}");
    }
    header += &format!(" {:>8}", "seconds");
    println!("{header}");
    for r in records {
        let mut line = format!("{:>5} {:>6} {:>10.4}", r.epoch, r.step, r.train_loss);
        for (_, v) in &r.metrics {
            line += &format!(" {v:>9.4}");
        }
        line += &format!(" {:>8.1}", r.seconds);
        println!("{line}");
    }
    println!(
        "validation {} {:.4} after {} epochs; training {:.1} s ({:.0} tokens/s), {:.1} s in all; model in {}",
        summary.metric.name(),
        summary.value,
        records.len(),
        summary.train_seconds,
        summary.tokens_per_s,
        summary.wall_seconds,
        summary.output.display()
    );
}

/// A progress bar on stderr: redrawn on a terminal, a plain line every 10 s otherwise.
struct Progress {
    enabled: bool,
    tty: bool,
    total: u64,
    last_plain: Instant,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            total,
            last_plain: Instant::now(),
        }
    }

    fn update(&mut self, step: u64, epoch: u32, loss: f64, tokens_per_s: f64) {
        if !self.enabled {
            return;
        }
        let done = step as f64 / self.total.max(1) as f64;
        let text = format!(
            "epoch {epoch} step {step}/{} loss {loss:.4} {tokens_per_s:.0} tokens/s",
            self.total
        );
        if self.tty {
            let width = 30;
            let filled = (done * width as f64) as usize;
            eprint!(
                "\r[{}{}] {:>3.0}% {text}\x1b[K",
                "#".repeat(filled),
                " ".repeat(width - filled),
                done * 100.0
            );
        } else if self.last_plain.elapsed() >= Duration::from_secs(10) || step == self.total {
            eprintln!("{:>3.0}% {text}", done * 100.0);
            self.last_plain = Instant::now();
        }
    }

    fn epoch_done(&mut self, record: &EpochRecord, metric: Metric) {
        if !self.enabled {
            return;
        }
        let value = record
            .metrics
            .iter()
            .find(|(m, _)| *m == metric)
            .map_or(f64::NAN, |(_, v)| *v);
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!(
            "epoch {} done: train loss {:.4}, validation {} {value:.4}",
            record.epoch,
            record.train_loss,
            metric.name()
        );
    }

    fn finish(&mut self) {
        if self.enabled && self.tty {
            eprint!("\r\x1b[K");
        }
    }
}
