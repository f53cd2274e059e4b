//! What the ranks report: steps (merged into the metrics log and the progress line),
//! evaluations, and rank 0's committed checkpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::checkpoints;
use crate::faults;
use crate::journal::Entry;
use crate::metrics::{merge_evals, merge_steps};
use crate::protocol::{EvalMetrics, StepMetrics};

use super::super::prune_checkpoints;
use super::{Flow, Machine};

impl Machine {
    pub(super) fn on_step(&mut self, rank: usize, m: StepMetrics) -> Flow {
        self.members[rank].view.last_step = Some(m.step);
        let step = m.step;
        let Some(log) = self.log.as_mut() else {
            return Flow::Continue;
        };
        if log.has_step(step) {
            // A survivor re-sent the report of the step it kept (see `StartFrom::Peer`),
            // which the last generation logged already.
            return Flow::Continue;
        }
        let Some(all) = self.steps.add(step, rank, m) else {
            return Flow::Continue;
        };
        let merged = merge_steps(&all);
        self.last_progress = Instant::now();
        if let Err(e) = log.write_step(&merged, all.len()) {
            return Flow::End(Err(e));
        }
        if let Some(rate) = self.progress.due(step) {
            let left = self.job.train.max_steps.saturating_sub(step);
            tracing::info!(
                "step {step}/{}  loss {:.3}  mlm acc {:.3}  nsp acc {:.3}  lr {:.2e}  {:.0} tokens/s  {rate:.2} steps/s  eta {}",
                self.job.train.max_steps,
                merged.loss,
                merged.mlm_accuracy,
                merged.nsp_accuracy,
                merged.lr,
                merged.tokens_per_s,
                eta(left, rate)
            );
        }
        let epoch = (step * self.job.train.global_batch_size) / self.total_rows;
        self.board.update(|s| {
            s.step = Some(step);
            s.epoch = Some(epoch);
            s.loss = Some(merged.loss);
            s.tokens_per_s = Some(merged.tokens_per_s);
        });
        self.board.record_loss(step, merged.loss);
        Flow::Continue
    }

    pub(super) fn on_eval(&mut self, rank: usize, m: EvalMetrics) -> Flow {
        let Some(all) = self.evals.add(m.step, rank, m) else {
            return Flow::Continue;
        };
        let merged = merge_evals(&all);
        let Some(log) = self.log.as_mut() else {
            return Flow::Continue;
        };
        if let Err(e) = log.write_eval(&merged) {
            return Flow::End(Err(e));
        }
        tracing::info!(
            "validation at step {}: loss {:.3}  mlm acc {:.3}  nsp acc {:.3}  perplexity {:.1}  ({} samples)",
            merged.step,
            merged.loss,
            merged.mlm_accuracy,
            merged.nsp_accuracy,
            merged.perplexity,
            merged.samples
        );
        let value = serde_json::to_value(&merged).ok();
        self.board.update(|s| s.last_eval = value);
        Flow::Continue
    }

    /// Rank 0 sealed a checkpoint: record it, point `latest` at it, drop old ones.
    pub(super) fn on_checkpointed(&mut self, step: u64, dir: PathBuf, seconds: f64) -> Flow {
        let ckpt_dir = checkpoints::checkpoints_dir(&self.job.job.run_dir);
        if let Flow::End(e) = self.journal_append(&Entry::CheckpointCommitted {
            step,
            dir: dir.clone(),
            seconds,
        }) {
            return Flow::End(e);
        }
        if faults::due(faults::CRASH_COMMITTING_CHECKPOINT, step) {
            std::process::abort();
        }
        if let Err(e) = checkpoints::set_latest(&ckpt_dir, step) {
            tracing::error!("cannot update {}/latest: {e:#}", ckpt_dir.display());
        }
        match prune_checkpoints(&self.job) {
            Ok(removed) => {
                for old in removed {
                    tracing::debug!(dir = %old.display(), "removed an old checkpoint");
                }
            }
            Err(e) => tracing::warn!("cannot remove old checkpoints: {e:#}"),
        }
        tracing::info!(
            "checkpoint of step {step} committed in {seconds:.2} s: {}",
            dir.display()
        );
        self.unsaved = None;
        self.board.update(|s| s.last_checkpoint = Some(step));
        Flow::Continue
    }
}

/// Decides when a training progress line is due: the first step, then at most one every
/// [`ProgressLine::EVERY`], and the last step; carries the step rate since the start.
pub(super) struct ProgressLine {
    started: Instant,
    first_step: u64,
    last_step: u64,
    last_line: Option<Instant>,
}

impl ProgressLine {
    const EVERY: Duration = Duration::from_secs(5);

    pub(super) fn new(first_step: u64, last_step: u64) -> ProgressLine {
        ProgressLine {
            started: Instant::now(),
            first_step,
            last_step,
            last_line: None,
        }
    }

    /// `Some(steps per second)` when `step` (steps completed) deserves a line.
    fn due(&mut self, step: u64) -> Option<f64> {
        let due = match self.last_line {
            None => true,
            Some(t) => t.elapsed() >= Self::EVERY || step >= self.last_step,
        };
        if !due {
            return None;
        }
        self.last_line = Some(Instant::now());
        let done = step.saturating_sub(self.first_step) as f64;
        Some(done / self.started.elapsed().as_secs_f64().max(1e-9))
    }
}

/// `1h02m`, `3m05s`, `12s`: the time `steps` take at `rate` steps/s.
fn eta(steps: u64, rate: f64) -> String {
    if rate <= 0.0 {
        return "?".into();
    }
    let s = (steps as f64 / rate).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
