//! One optimizer step, read top to bottom: forward/backward per micro-batch with the
//! gradients summed into one flat buffer, one all-reduce of it, clipping, the optimizer
//! update on the flat master parameters, and the new parameters written back into the
//! model. The flat buffers are host memory, or device tensors on a GPU (see
//! [`crate::resident`]).

use std::time::Instant;

use anyhow::Result;
use bertrain_coordinator::job::TrainSection;
use bertrain_model::TrainingBackend;
use bertrain_model::params::{Accumulation, accumulate_grads, load_flat_params};
use bertrain_model::{BertForPreTraining, ParamLayout, PretrainingBatch, PretrainingOutput};
use burn::module::AutodiffModule;
use burn::prelude::*;

use crate::batch::HostBatch;
use crate::collective::Collective;
use crate::optim::{self, OptimizerConfig, OptimizerState};
use crate::resident::DeviceMaster;

/// The model being trained with its master parameters and optimizer state.
pub struct Trainer<B: TrainingBackend> {
    pub model: BertForPreTraining<B>,
    pub layout: ParamLayout,
    /// Master copy of the parameters, the one the optimizer updates and checkpoints save.
    pub params: Vec<f32>,
    pub optimizer: OptimizerConfig,
    pub state: OptimizerState,
    pub max_grad_norm: f32,
    /// Base of the dropout seeds; see [`Trainer::step`].
    pub seed: u64,
    /// Run the padded encoder instead of the unpadded one (the same function): only for
    /// benchmarks that compare the two.
    pub padded: bool,
    pub device: B::Device,
    /// The step's flat gradients plus the stop vote, kept from step to step (for BERT-base
    /// it is 440 MB: allocating and zeroing it every step was 2% of a step).
    grads: Vec<f32>,
    /// Master parameters and optimizer state on the device instead of in `params` and
    /// `state` (see [`Trainer::keep_on_device`]).
    resident: Option<DeviceMaster<B::InnerBackend>>,
}

/// What one rank measured in one step. Losses and accuracies are over this rank's part
/// of the global batch; the coordinator averages the ranks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub mlm_loss: f64,
    pub nsp_loss: f64,
    pub mlm_accuracy: f64,
    pub nsp_accuracy: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub padding_fraction: f64,
    /// Some rank asked to stop after this step (see [`Trainer::step`]'s `stop_vote`).
    pub stop_agreed: bool,
    /// Seconds in forward/backward, in the all-reduce, and in the optimizer.
    pub compute_s: f64,
    pub comm_s: f64,
    pub optimizer_s: f64,
}

/// The error of a step whose all-reduce failed (a peer was lost): the trainer still holds
/// the state of the step before, and `stats` is what this rank computed of the failed
/// step, whose losses are those the step reports when it is done again.
#[derive(Debug)]
pub struct AllReduceFailed {
    pub stats: StepStats,
    pub error: anyhow::Error,
}

impl std::fmt::Display for AllReduceFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for AllReduceFailed {}

/// Running sums of losses and prediction counts over micro-batches.
#[derive(Debug, Default)]
struct Tally {
    rows: usize,
    mlm_loss: f64,
    nsp_loss: f64,
    mlm_correct: usize,
    mlm_total: usize,
    nsp_correct: usize,
    tokens: usize,
    padded_positions: usize,
}

impl Tally {
    fn add<B: Backend>(
        &mut self,
        batch: &HostBatch,
        output: &PretrainingOutput<B>,
        device_batch: &PretrainingBatch<B>,
        mlm_loss: f64,
        nsp_loss: f64,
    ) {
        let rows = batch.rows;
        self.rows += rows;
        self.mlm_loss += mlm_loss * rows as f64;
        self.nsp_loss += nsp_loss * rows as f64;
        self.mlm_correct += count_equal(
            output.mlm_logits.clone().argmax(1).flatten(0, 1),
            device_batch.masked_lm_ids.clone(),
        );
        self.mlm_total += batch.masked_lm_ids.len();
        self.nsp_correct += count_equal(
            output.nsp_logits.clone().argmax(1).flatten(0, 1),
            device_batch.next_sentence_labels.clone(),
        );
        self.tokens += batch.tokens;
        self.padded_positions += batch.rows * batch.seq_len;
    }

    fn stats(&self) -> StepStats {
        let rows = self.rows.max(1) as f64;
        StepStats {
            loss: (self.mlm_loss + self.nsp_loss) / rows,
            mlm_loss: self.mlm_loss / rows,
            nsp_loss: self.nsp_loss / rows,
            mlm_accuracy: self.mlm_correct as f64 / self.mlm_total.max(1) as f64,
            nsp_accuracy: self.nsp_correct as f64 / rows,
            tokens: self.tokens,
            padding_fraction: 1.0 - self.tokens as f64 / self.padded_positions.max(1) as f64,
            ..StepStats::default()
        }
    }
}

fn count_equal<B: Backend>(a: Tensor<B, 1, Int>, b: Tensor<B, 1, Int>) -> usize {
    a.equal(b).int().sum().into_scalar().elem::<i64>() as usize
}

/// [`AllReduceFailed`] with what the step computed before its all-reduce.
fn failed(tally: &Tally, started: Instant, error: anyhow::Error) -> anyhow::Error {
    let mut stats = tally.stats();
    stats.compute_s = started.elapsed().as_secs_f64();
    anyhow::Error::new(AllReduceFailed { stats, error })
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

impl<B: TrainingBackend> Trainer<B> {
    /// A trainer with the job's optimizer, weight decay, clipping and seed.
    pub fn from_job(model: BertForPreTraining<B>, t: &TrainSection, device: B::Device) -> Self {
        let optimizer = OptimizerConfig::from_job(t);
        Self::new(model, optimizer, t.max_grad_norm as f32, t.seed, device)
    }

    pub fn new(
        model: BertForPreTraining<B>,
        optimizer: OptimizerConfig,
        max_grad_norm: f32,
        seed: u64,
        device: B::Device,
    ) -> Self {
        let layout = ParamLayout::of(&model);
        let params = bertrain_model::flatten_params(&model);
        let state = OptimizerState::new(layout.total);
        let grads = vec![0.0; layout.total + 1];
        Trainer {
            model,
            layout,
            params,
            optimizer,
            state,
            max_grad_norm,
            seed,
            padded: false,
            device,
            grads,
            resident: None,
        }
    }

    /// Keeps the master parameters and optimizer state on the device from now on: each
    /// step's gradients, clipping, AdamW and the write-back into the model stay there (see
    /// [`crate::resident`]). `params` and `state` are then brought up to date only by
    /// [`Trainer::sync_host`].
    pub fn keep_on_device(&mut self) -> Result<()> {
        self.resident = Some(DeviceMaster::upload(
            &self.optimizer,
            &self.layout,
            &self.params,
            &self.state,
            &self.device,
        )?);
        Ok(())
    }

    /// Whether the master parameters and optimizer state live on the device (see
    /// [`Trainer::keep_on_device`]).
    pub fn keeps_state_on_device(&self) -> bool {
        self.resident.is_some()
    }

    /// Brings `params` and `state` up to date (a copy from the device when the state lives
    /// there; nothing otherwise). Checkpoints call it first.
    pub fn sync_host(&mut self) {
        if let Some(resident) = &self.resident {
            resident.download(&mut self.params, &mut self.state);
        }
    }

    /// Replaces the parameters (after a broadcast or a checkpoint load).
    pub fn set_params(&mut self, params: Vec<f32>) {
        let model = self.model.clone();
        self.model = load_flat_params(model, &params, &self.layout);
        self.params = params;
    }

    /// One optimizer step over this rank's `micro_batches` (together `local_rows`
    /// sequences of the global batch).
    ///
    /// Dropout draws from a generator seeded by (seed, step, rank, micro-batch), so the
    /// step is a pure function of its inputs: a resumed run repeats it bit for bit.
    ///
    /// `stop_vote` rides along with the gradients as one extra element of the all-reduce:
    /// if any rank votes, every rank learns it at the same step ([`StepStats::stop_agreed`])
    /// without another round trip, so all ranks can checkpoint the same step and stop.
    pub fn step(
        &mut self,
        step: u64,
        rank: usize,
        micro_batches: &[HostBatch],
        lr: f32,
        stop_vote: bool,
        collective: &mut dyn Collective,
    ) -> Result<StepStats> {
        let local_rows: usize = micro_batches.iter().map(|b| b.rows).sum();
        let started = Instant::now();
        let total = self.layout.total;
        if micro_batches.is_empty() {
            // Nothing overwrites last step's gradients: this rank contributes zeros.
            self.grads.fill(0.0);
        }
        let mut tally = Tally::default();
        for (micro, batch) in micro_batches.iter().enumerate() {
            // burn's dropout (on a GPU) draws by position: a stream per micro-batch. The
            // host-drawn masks key each row by its place in the step's global batch, from
            // one stream per step.
            B::seed(&self.device, dropout_seed(self.seed, step, rank, micro));
            bertrain_model::seed_dropout(dropout_seed(self.seed, step, 0, 0), batch.first_row);
            let device_batch = batch.to_device::<B>(&self.device);
            let output = if self.padded {
                self.model.forward_padded(&device_batch)
            } else {
                self.model.forward_unpadded(&device_batch, &batch.unpadding)
            };
            let losses = self.model.loss(&output, &device_batch);
            // Each micro-batch's loss is a mean over its rows; weighting by its share of
            // the local rows makes the summed gradient that of the mean over all of them.
            let share = batch.rows as f32 / local_rows as f32;
            let gradients = (losses.loss.clone() * share).backward();
            let how = if micro == 0 {
                Accumulation::Overwrite
            } else {
                Accumulation::Add
            };
            match &mut self.resident {
                Some(resident) => resident.accumulate(&self.model, &gradients, &self.layout, how),
                None => {
                    accumulate_grads(&self.model, &gradients, &self.layout, &mut self.grads, how)
                }
            }
            tally.add(
                batch,
                &output,
                &device_batch,
                scalar(losses.mlm_loss),
                scalar(losses.nsp_loss),
            );
        }
        let computed = Instant::now();

        // All-reduce, clip, update, and the new parameters into the model: on the device
        // when the state lives there, else on the host buffers.
        let (stop_agreed, communicated, grad_norm) = match &mut self.resident {
            Some(resident) => {
                if micro_batches.is_empty() {
                    resident.zero_grads(&self.layout);
                }
                let stop_agreed = match resident.all_reduce(collective, stop_vote) {
                    Ok(agreed) => agreed,
                    Err(error) => return Err(failed(&tally, started, error)),
                };
                let communicated = Instant::now();
                let grad_norm = resident.clip(self.max_grad_norm);
                resident.adamw(&self.optimizer, &mut self.state, lr);
                let model = self.model.clone();
                self.model = resident.write_into(model, &self.layout);
                (stop_agreed, communicated, grad_norm)
            }
            None => {
                self.grads[total] = if stop_vote { 1.0 } else { 0.0 };
                if let Err(error) = collective.all_reduce_mean(&mut self.grads) {
                    return Err(failed(&tally, started, error));
                }
                let stop_agreed = self.grads[total] > 0.0;
                let communicated = Instant::now();
                let grad_norm = optim::clip_grad_norm(&mut self.grads[..total], self.max_grad_norm);
                optim::update(
                    &self.optimizer,
                    &self.layout,
                    &mut self.state,
                    &mut self.params,
                    &self.grads[..total],
                    lr,
                );
                let model = self.model.clone();
                self.model = load_flat_params(model, &self.params, &self.layout);
                (stop_agreed, communicated, grad_norm)
            }
        };

        let mut stats = tally.stats();
        stats.stop_agreed = stop_agreed;
        stats.grad_norm = grad_norm as f64;
        stats.compute_s = (computed - started).as_secs_f64();
        stats.comm_s = (communicated - computed).as_secs_f64();
        stats.optimizer_s = communicated.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Losses and accuracies on `batches` without dropout or gradients.
    pub fn evaluate(&self, batches: &[HostBatch]) -> StepStats {
        let model = self.model.valid();
        let mut tally = Tally::default();
        for batch in batches {
            let device_batch = batch.to_device::<B::InnerBackend>(&self.device);
            let output = model.forward_unpadded(&device_batch, &batch.unpadding);
            let losses = model.loss(&output, &device_batch);
            tally.add(
                batch,
                &output,
                &device_batch,
                scalar(losses.mlm_loss),
                scalar(losses.nsp_loss),
            );
        }
        tally.stats()
    }
}

/// Seed of the dropout generator for one micro-batch.
fn dropout_seed(seed: u64, step: u64, rank: usize, micro: usize) -> u64 {
    let mut x = seed ^ 0xD1B5_4A32_D192_ED03;
    for v in [step, rank as u64, micro as u64] {
        x = (x ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use crate::collective::LocalCollective;
    use crate::optim::Optimizer as Rule;
    use bertrain_dataprep::Instance;
    use bertrain_model::{BertConfig, flatten_params, init_bert};
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};

    /// A tiny BERT without dropout, so that two ways of training it see the same forward.
    fn config() -> BertConfig {
        BertConfig {
            vocab_size: 120,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..BertConfig::preset("tiny").unwrap()
        }
    }

    /// Four rows of different lengths with a few predictions each, a function of `seed`.
    fn batch(seed: u64) -> HostBatch {
        let instances: Vec<Instance> = (0..4u64)
            .map(|row| {
                let len = 12 + 3 * row as usize;
                let input_ids: Vec<u32> = (0..len as u64)
                    .map(|i| 5 + ((seed * 31 + row * 17 + i * 7) % 110) as u32)
                    .collect();
                let masked_lm_positions = vec![1, 4, (len - 2) as u32];
                Instance {
                    token_type_ids: (0..len).map(|i| u8::from(i >= len / 2)).collect(),
                    masked_lm_ids: masked_lm_positions
                        .iter()
                        .map(|&p| input_ids[p as usize])
                        .collect(),
                    input_ids,
                    masked_lm_positions,
                    next_sentence_label: ((seed + row) % 2) as u8,
                }
            })
            .collect();
        HostBatch::collate(&instances)
    }

    /// burn's own AdamW (`burn::optim::AdamW`) driving the model directly, with the same
    /// hyperparameters: the reference the trainer's flat-buffer AdamW must reproduce.
    fn burn_adamw(steps: u64, lr: f32, weight_decay: f32) -> Vec<f32> {
        let device = Default::default();
        let mut model = init_bert::<CpuBackend>(&config(), 7, &device);
        let mut optimizer = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-6)
            .with_weight_decay(weight_decay)
            .init();
        for step in 0..steps {
            let device_batch = batch(step).to_device::<CpuBackend>(&device);
            let output = model.forward(&device_batch);
            let loss = model.loss(&output, &device_batch).loss;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(lr as f64, model, grads);
        }
        flatten_params(&model)
    }

    /// The trainer's parameters after `steps` steps of its own AdamW.
    fn trainer_adamw(steps: u64, lr: f32, weight_decay: f32) -> Trainer<CpuBackend> {
        let device = Default::default();
        let mut trainer = Trainer::new(
            init_bert::<CpuBackend>(&config(), 7, &device),
            OptimizerConfig::bert(Rule::Adamw, weight_decay),
            0.0, // no clipping: burn's optimizer has none configured either
            0,
            device,
        );
        for step in 0..steps {
            trainer
                .step(step, 0, &[batch(step)], lr, false, &mut LocalCollective)
                .unwrap();
        }
        assert_eq!(
            flatten_params(&trainer.model),
            trainer.params,
            "the model holds the master parameters"
        );
        trainer
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The trainer keeps parameters and moments in flat host buffers (the layout the
    /// all-reduce and checkpoints use), not in burn's optimizer. Its AdamW must still be
    /// burn's AdamW: the same update, applied to the right parameter. This also checks
    /// the gradient flattening and the write-back into the model.
    #[test]
    fn adamw_matches_burns_adamw_over_steps() {
        let (steps, lr) = (3, 1e-2);
        let trainer = trainer_adamw(steps, lr, 0.0);
        let reference = burn_adamw(steps, lr, 0.0);
        let initial = flatten_params(&init_bert::<CpuBackend>(&config(), 7, &Default::default()));
        for slot in &trainer.layout.slots {
            let range = slot.offset..slot.offset + slot.len;
            let diff = max_diff(&trainer.params[range.clone()], &reference[range.clone()]);
            assert!(diff < 1e-5, "{}: differs from burn by {diff}", slot.name);
            assert_ne!(
                trainer.params[range.clone()],
                initial[range],
                "{} did not move",
                slot.name
            );
        }
    }

    /// A stand-in for a second rank that contributes zeros: the mean halves every value.
    struct HalvingCollective;

    impl Collective for HalvingCollective {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
            buf.iter_mut().for_each(|v| *v *= 0.5);
            Ok(())
        }
        fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&mut self) -> Result<()> {
            Ok(())
        }
    }

    /// A peer lost in the middle of the all-reduce: the collective fails after it has
    /// written part of the buffer.
    struct FailingCollective;

    impl Collective for FailingCollective {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
            let half = buf.len() / 2;
            buf[..half].fill(f32::NAN);
            anyhow::bail!("connection reset by peer")
        }
        fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&mut self) -> Result<()> {
            Ok(())
        }
    }

    /// What recovery from a live peer relies on: a step whose all-reduce fails changes
    /// neither the parameters, nor the optimizer state, nor the model, so a survivor holds
    /// exactly the state after its last completed step.
    #[test]
    fn a_failed_all_reduce_leaves_the_state_of_the_last_completed_step() {
        let mut trainer = train_three_steps(false, &mut LocalCollective);
        let (params, state) = (trainer.params.clone(), trainer.state.clone());
        let failed = trainer.step(3, 0, &[batch(3)], 1e-2, false, &mut FailingCollective);
        let failed = failed.unwrap_err();
        let computed = &failed.downcast_ref::<AllReduceFailed>().unwrap().stats;
        assert!(computed.loss > 0.0 && computed.tokens > 0, "{computed:?}");
        assert_eq!(trainer.state, state);
        assert!(trainer.params == params, "parameters moved");
        assert!(flatten_params(&trainer.model) == params, "the model moved");
    }

    /// Three steps of two micro-batches each, with decay and clipping, with the master
    /// state on the host or on the device; returns the trainer with its host copy synced.
    fn train_three_steps(on_device: bool, collective: &mut dyn Collective) -> Trainer<CpuBackend> {
        let device = Default::default();
        let mut trainer = Trainer::new(
            init_bert::<CpuBackend>(&config(), 7, &device),
            OptimizerConfig::bert(Rule::Adamw, 0.01),
            0.5, // below the gradients' norm: clipping takes part
            0,
            device,
        );
        if on_device {
            trainer.keep_on_device().unwrap();
        }
        for step in 0..3 {
            let stats = trainer
                .step(
                    step,
                    0,
                    &[batch(step), batch(step + 10)],
                    1e-2,
                    step == 2,
                    collective,
                )
                .unwrap();
            assert!(
                stats.grad_norm > 0.5,
                "clipping must be exercised: {}",
                stats.grad_norm
            );
            let world = collective.world_size();
            assert_eq!(stats.stop_agreed, step == 2, "world {world}, step {step}");
        }
        trainer.sync_host();
        trainer
    }

    /// The device-resident path (gradients, all-reduce, clipping, AdamW and write-back on
    /// the device) makes the same updates as the host path, alone and with another rank.
    #[test]
    fn device_resident_state_trains_like_the_host_path() {
        for world in [1, 2] {
            let collective = || -> Box<dyn Collective> {
                if world == 1 {
                    Box::new(LocalCollective)
                } else {
                    Box::new(HalvingCollective)
                }
            };
            let host = train_three_steps(false, collective().as_mut());
            let device = train_three_steps(true, collective().as_mut());
            let diff = max_diff(&host.params, &device.params);
            assert!(diff < 5e-6, "world {world}: parameters differ by {diff}");
            let diff = max_diff(&host.state.exp_avg_sq, &device.state.exp_avg_sq);
            assert!(
                diff < 1e-8,
                "world {world}: second moments differ by {diff}"
            );
            assert_eq!(device.state.step, 3);
            assert_eq!(
                flatten_params(&device.model),
                device.params,
                "the model holds the master"
            );
            let initial =
                flatten_params(&init_bert::<CpuBackend>(&config(), 7, &Default::default()));
            assert!(
                max_diff(&initial, &device.params) > 1e-3,
                "world {world}: nothing moved"
            );
        }
    }

    /// burn decays every parameter; the trainer, as BERT, decays matrices only. After one
    /// step (before the two runs' forwards diverge) decaying slots equal burn's run with
    /// decay, and biases and LayerNorm equal burn's run without.
    #[test]
    fn adamw_weight_decay_matches_burns_on_matrices_only() {
        let (lr, weight_decay) = (1e-2, 0.1);
        let trainer = trainer_adamw(1, lr, weight_decay);
        let with_decay = burn_adamw(1, lr, weight_decay);
        let without_decay = burn_adamw(1, lr, 0.0);
        for slot in &trainer.layout.slots {
            let range = slot.offset..slot.offset + slot.len;
            let reference = if slot.decays() {
                &with_decay
            } else {
                &without_decay
            };
            let diff = max_diff(&trainer.params[range.clone()], &reference[range]);
            assert!(diff < 1e-6, "{}: differs from burn by {diff}", slot.name);
        }
    }
}
