//! Evaluation on the validation split.

use anyhow::{Result, bail};
use bertrain_coordinator::EvalMetrics;
use bertrain_coordinator::job::JobConfig;
use bertrain_dataprep::Manifest;
use bertrain_model::BertConfig;
use bertrain_model::TrainingBackend;

use crate::loader::{BatchShape, SampleSource};
use crate::schedule::every;
use crate::trainer::Trainer;

/// This rank's share of the validation split: the same samples at every evaluation (the
/// first `per_rank` of the split's seeded order, offset by rank), so evaluations compare.
pub(crate) struct Evaluator {
    /// `eval.every_steps`.
    every_steps: u64,
    source: SampleSource,
    pub(crate) shape: BatchShape,
}

impl Evaluator {
    pub fn from_job(
        manifest: Manifest,
        job: &JobConfig,
        model: &BertConfig,
        rank: usize,
        world: usize,
    ) -> Result<Evaluator> {
        let micro = job.train.micro_batch_size;
        let available = manifest.total_rows() / world as u64;
        let per_rank = match job.eval.max_batches {
            0 => available,
            n => (n * micro).min(available),
        };
        if per_rank == 0 {
            bail!(
                "validation set {} has {} rows, fewer than one per worker ({world})",
                manifest.dir().display(),
                manifest.total_rows()
            );
        }
        let source = SampleSource::new(manifest, job.train.seed, model)?;
        let shape = BatchShape {
            global_batch: per_rank * world as u64,
            micro_batch: micro as usize,
            rank,
            world,
        };
        Ok(Evaluator {
            every_steps: job.eval.every_steps,
            source,
            shape,
        })
    }

    /// Whether `eval.every_steps` asks for an evaluation after `done` steps.
    pub fn due(&self, done: u64) -> bool {
        every(self.every_steps, done)
    }

    pub fn run<B: TrainingBackend>(
        &mut self,
        trainer: &Trainer<B>,
        step: u64,
    ) -> Result<EvalMetrics> {
        let data = crate::loader::step_data(&mut self.source, self.shape, 0)?;
        let s = trainer.evaluate(&data.micro_batches);
        Ok(EvalMetrics {
            step,
            loss: s.loss,
            mlm_loss: s.mlm_loss,
            nsp_loss: s.nsp_loss,
            mlm_accuracy: s.mlm_accuracy,
            nsp_accuracy: s.nsp_accuracy,
            perplexity: s.mlm_loss.exp(),
            samples: self.shape.global_batch / self.shape.world as u64,
        })
    }
}
