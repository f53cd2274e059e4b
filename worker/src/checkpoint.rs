//! Writing and loading checkpoints (the layout and commit protocol are in
//! `bertrain_coordinator::checkpoints`).
//!
//! Rank 0 copies the master parameters and optimizer state into a [`Snapshot`] (a memcpy)
//! and a background thread writes it while training goes on; the next checkpoint waits
//! for the previous one to finish. The directory is built under a temporary name and
//! renamed into place after its commit marker is written, so a crash at any moment leaves
//! either no `step-N` directory or a complete one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_coordinator::WorkerClient;
use bertrain_coordinator::checkpoints::{
    self as layout, CONFIG_FILE, OPTIMIZER_FILE, TRAINER_FILE, TrainerState, VOCAB_FILE,
    WEIGHTS_FILE,
};
use bertrain_coordinator::faults;
use bertrain_coordinator::job::JobConfig;
use bertrain_files::{sync_dir, write_synced};
use bertrain_model::TrainingBackend;
use bertrain_model::params::{flat_to_hf, hf_to_flat};
use bertrain_model::{BertConfig, ParamLayout, hf};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::optim::OptimizerState;
use crate::prepare::Prepared;
use crate::schedule::every;
use crate::trainer::Trainer;

/// Everything a checkpoint holds, copied off the trainer.
pub struct Snapshot {
    pub config: BertConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub optimizer: OptimizerState,
    pub trainer: TrainerState,
    /// The vocabulary file to copy in (the dataset's).
    pub vocab: PathBuf,
    /// Its `tokenizer_config.json`: the casing, as dataprep decided it.
    pub tokenizer_config: String,
}

/// Writes `snapshot` as `checkpoints/step-N` (see the module docs). Returns the directory.
pub fn write(checkpoints: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let step = snapshot.trainer.step;
    let name = layout::step_dir_name(step);
    let target = checkpoints.join(&name);
    if target.exists() {
        // A resume starts from the newest valid checkpoint, so a step-N ahead of it is the
        // debris of an interrupted write. A valid one is never overwritten.
        if layout::verify(&target).is_ok() {
            bail!(
                "{} is already a committed checkpoint; refusing to overwrite it",
                target.display()
            );
        }
        fs::remove_dir_all(&target)
            .with_context(|| format!("removing the incomplete {}", target.display()))?;
    }
    let tmp = checkpoints.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        hf::write_safetensors(
            &tmp.join(WEIGHTS_FILE),
            &snapshot.layout,
            &snapshot.params,
            Some(meta),
        )?;
        crash_if_injected(step);
        write_optimizer(
            &tmp.join(OPTIMIZER_FILE),
            &snapshot.layout,
            &snapshot.optimizer,
        )?;
        write_synced(
            &tmp.join(TRAINER_FILE),
            &serde_json::to_vec_pretty(&snapshot.trainer)?,
        )?;
        write_synced(
            &tmp.join(CONFIG_FILE),
            snapshot.config.to_hf_json().as_bytes(),
        )?;
        let vocab = fs::read(&snapshot.vocab)
            .with_context(|| format!("cannot read {}", snapshot.vocab.display()))?;
        write_synced(&tmp.join(VOCAB_FILE), &vocab)?;
        // The tokenizer's casing travels with the vocabulary.
        write_synced(
            &tmp.join(hf::TOKENIZER_CONFIG_FILE),
            snapshot.tokenizer_config.as_bytes(),
        )?;
        layout::seal(&tmp, step)?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("cannot move {} into place", target.display()))?;
        sync_dir(checkpoints)
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", target.display())));
    }
    Ok(target)
}

/// See `faults::CRASH_WRITING_CHECKPOINT`.
fn crash_if_injected(step: u64) {
    if faults::due(faults::CRASH_WRITING_CHECKPOINT, step) {
        eprintln!("dying in the middle of the checkpoint write of step {step}");
        std::process::abort();
    }
}

/// Removes `.step-N.partial-PID` directories: writes that a dead process left behind. Only
/// called by the one writer of a generation, before it writes anything.
pub fn remove_partial_writes(checkpoints: &Path) -> Result<()> {
    for entry in fs::read_dir(checkpoints)
        .with_context(|| format!("cannot list {}", checkpoints.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".partial-") {
            tracing::info!("removing {name}, an interrupted checkpoint write");
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// The optimizer's moments as safetensors, `exp_avg.<param>` and `exp_avg_sq.<param>` in
/// HF shapes, with the update count in the metadata.
fn write_optimizer(path: &Path, layout: &ParamLayout, state: &OptimizerState) -> Result<()> {
    let mut buffers = Vec::new();
    for slot in &layout.slots {
        for (prefix, values) in [
            ("exp_avg", &state.exp_avg),
            ("exp_avg_sq", &state.exp_avg_sq),
        ] {
            let bytes: Vec<u8> = flat_to_hf(slot, values)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            buffers.push((format!("{prefix}.{}", slot.name), slot.hf_shape(), bytes));
        }
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("step".to_string(), state.step.to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_synced(path, &bytes)
}

/// A checkpoint read back: parameters and optimizer state in `layout`'s order.
pub struct Loaded {
    pub params: Vec<f32>,
    pub optimizer: OptimizerState,
    pub trainer: TrainerState,
}

/// Loads a verified checkpoint directory into `layout` (built from the job's model config).
pub fn load(dir: &Path, layout: &ParamLayout) -> Result<Loaded> {
    let trainer = layout::verify(dir)?;
    let model = hf::load_dir(dir, layout, 0)?;
    if !model.initialised.is_empty() {
        bail!(
            "{}: checkpoint lacks {}",
            dir.display(),
            model.initialised.join(", ")
        );
    }
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not safetensors", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no optimizer step in the metadata", path.display()))?;
    let mut optimizer = OptimizerState::new(layout.total);
    optimizer.step = step;
    for slot in &layout.slots {
        for (prefix, out) in [
            ("exp_avg", &mut optimizer.exp_avg),
            ("exp_avg_sq", &mut optimizer.exp_avg_sq),
        ] {
            let name = format!("{prefix}.{}", slot.name);
            let view = tensors
                .tensor(&name)
                .with_context(|| format!("{}: missing tensor {name}", path.display()))?;
            if view.shape() != slot.hf_shape().as_slice() || view.dtype() != Dtype::F32 {
                bail!(
                    "{}: tensor {name} has the wrong shape or type",
                    path.display()
                );
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            hf_to_flat(slot, &values, out);
        }
    }
    Ok(Loaded {
        params: model.flat,
        optimizer,
        trainer,
    })
}

/// A checkpoint write running in the background.
pub struct PendingWrite {
    pub step: u64,
    started: Instant,
    thread: JoinHandle<(Result<PathBuf>, Snapshot)>,
}

/// The outcome of a background write, and the snapshot's buffers for the next one.
pub struct Written {
    pub step: u64,
    pub result: Result<PathBuf>,
    pub seconds: f64,
    pub snapshot: Option<Snapshot>,
}

impl PendingWrite {
    pub fn start(checkpoints: PathBuf, snapshot: Snapshot) -> PendingWrite {
        let step = snapshot.trainer.step;
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || (write(&checkpoints, &snapshot), snapshot))
            .expect("spawning the checkpoint writer");
        PendingWrite {
            step,
            started: Instant::now(),
            thread,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the write to end.
    pub fn finish(self) -> Written {
        let (result, snapshot) = match self.thread.join() {
            Ok((result, snapshot)) => (result, Some(snapshot)),
            Err(_) => (Err(anyhow::anyhow!("the checkpoint writer panicked")), None),
        };
        Written {
            step: self.step,
            result,
            seconds: self.started.elapsed().as_secs_f64(),
            snapshot,
        }
    }
}

impl Snapshot {
    /// Copies `params` and `optimizer` into this snapshot's buffers. Reusing the buffers of
    /// the previous checkpoint makes the copy a plain memcpy into memory that is already
    /// mapped; fresh buffers would page-fault every page in (measured: 4 s instead of a
    /// fraction of a second for BERT-base's 1.3 GB).
    pub fn refill(&mut self, params: &[f32], optimizer: &OptimizerState) {
        copy_into(&mut self.params, params);
        copy_into(&mut self.optimizer.exp_avg, &optimizer.exp_avg);
        copy_into(&mut self.optimizer.exp_avg_sq, &optimizer.exp_avg_sq);
        self.optimizer.step = optimizer.step;
    }
}

fn copy_into(to: &mut Vec<f32>, from: &[f32]) {
    if to.len() == from.len() {
        to.copy_from_slice(from);
    } else {
        *to = from.to_vec();
    }
}
/// Rank 0's checkpointing: snapshots taken between steps, written in the background, one
/// at a time, each reported to the coordinator when done.
pub(crate) struct Saver {
    /// `checkpoint.every_steps`.
    every_steps: u64,
    checkpoints: PathBuf,
    config: BertConfig,
    vocab: PathBuf,
    tokenizer_config: String,
    base: TrainerState,
    total_rows: u64,
    pending: Option<PendingWrite>,
    /// The last written snapshot, whose buffers the next checkpoint copies into.
    spare: Option<Snapshot>,
}

impl Saver {
    pub fn from_job(job: &JobConfig, prepared: &Prepared, world: usize) -> Result<Saver> {
        let checkpoints = layout::checkpoints_dir(&job.job.run_dir);
        std::fs::create_dir_all(&checkpoints)
            .with_context(|| format!("cannot create {}", checkpoints.display()))?;
        remove_partial_writes(&checkpoints)?;
        let vocab = prepared.train.dir().join(&prepared.train.vocab_file);
        let casing = bertrain_dataprep::Vocab::load(&vocab, None)?.casing;
        Ok(Saver {
            every_steps: job.checkpoint.every_steps,
            checkpoints,
            config: prepared.config.clone(),
            tokenizer_config: casing.tokenizer_config_json(),
            vocab,
            base: TrainerState {
                format_version: layout::TRAINER_FORMAT_VERSION,
                step: 0,
                epoch: 0,
                samples_consumed: 0,
                global_batch_size: job.train.global_batch_size,
                lr: 0.0,
                seed: job.train.seed,
                world_size: world,
                job_hash: prepared.job_hash(),
                dataset_hash: prepared.train.content_hash(),
            },
            total_rows: prepared.train.total_rows(),
            pending: None,
            spare: None,
        })
    }

    /// Whether `checkpoint.every_steps` asks for a checkpoint after `done` steps.
    pub fn due(&self, done: u64) -> bool {
        every(self.every_steps, done)
    }

    /// Copies the state after `step` steps and starts writing it (after the previous write
    /// has finished: at most one write at a time).
    pub fn start<B: TrainingBackend>(
        &mut self,
        client: &WorkerClient,
        trainer: &Trainer<B>,
        step: u64,
        lr: f64,
    ) -> Result<()> {
        self.wait(client)?;
        let samples = step * self.base.global_batch_size;
        let trainer_state = TrainerState {
            step,
            epoch: samples / self.total_rows,
            samples_consumed: samples,
            lr,
            ..self.base.clone()
        };
        let snapshot = match self.spare.take() {
            Some(mut spare) => {
                spare.refill(&trainer.params, &trainer.state);
                spare.trainer = trainer_state;
                spare
            }
            None => Snapshot {
                config: self.config.clone(),
                layout: trainer.layout.clone(),
                params: trainer.params.clone(),
                optimizer: trainer.state.clone(),
                trainer: trainer_state,
                vocab: self.vocab.clone(),
                tokenizer_config: self.tokenizer_config.clone(),
            },
        };
        self.pending = Some(PendingWrite::start(self.checkpoints.clone(), snapshot));
        Ok(())
    }

    /// Reports a write that has finished, without waiting for one that has not.
    pub fn report_finished(&mut self, client: &WorkerClient) -> Result<()> {
        if self.pending.as_ref().is_some_and(PendingWrite::is_finished) {
            self.wait(client)?;
        }
        Ok(())
    }

    /// Waits for the write in progress, if any, and reports it.
    pub fn wait(&mut self, client: &WorkerClient) -> Result<()> {
        if let Some(pending) = self.pending.take() {
            let mut written = pending.finish();
            self.spare = written.snapshot.take();
            if let Err(e) = &written.result {
                tracing::error!("checkpoint of step {} failed: {e:#}", written.step);
            }
            client.report_checkpoint(written.step, &written.result, written.seconds)?;
        }
        Ok(())
    }
}
