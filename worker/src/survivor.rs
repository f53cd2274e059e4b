//! What a worker keeps when its generation ends, and where the next generation's state
//! comes from: a survivor of a lost rank keeps its parameters, optimizer state, step and
//! last reports ([`Held`]), offers the step when it joins again, and, when the coordinator
//! picks it, broadcasts the state to everyone ([`starting_state`]).

use anyhow::{Result, bail};
use bertrain_coordinator::job::JobConfig;
use bertrain_coordinator::protocol::StartFrom;
use bertrain_coordinator::{StepMetrics, Welcome};
use bertrain_model::ParamLayout;
use bertrain_model::TrainingBackend;

use crate::checkpoint;
use crate::collective::Collective;
use crate::optim::OptimizerState;
use crate::prepare::Prepared;
use crate::trainer::Trainer;

/// What a worker keeps from one generation for the next: what it built for the job (so a
/// survivor does not verify the dataset again), and the training state it had when its
/// generation ended badly or to regroup.
#[derive(Default)]
pub(crate) struct Kept {
    pub prepared: Option<Prepared>,
    pub held: Option<Held>,
}

/// A rank's training state after `step` steps of `job`, kept when a peer or the
/// coordinator was lost (or the ranks regrouped), and offered to the next generation
/// (`StartFrom::Peer`).
pub(crate) struct Held {
    job: JobConfig,
    pub step: u64,
    params: Vec<f32>,
    optimizer: OptimizerState,
    /// This rank's reports of the last steps it computed, up to `step`, or `step + 1` if
    /// that step's all-reduce failed here while it completed on another rank. The
    /// coordinator may not have logged them (it was lost itself, or restarted), so the
    /// ones up to where the next generation starts are sent again; it keeps what it lacks.
    pub reports: Vec<StepMetrics>,
}

/// The reports a rank sent last (see `Held::reports`).
#[derive(Default)]
pub(crate) struct RecentReports(std::collections::VecDeque<StepMetrics>);

impl RecentReports {
    /// More steps than a worker runs between losing the coordinator and noticing.
    const KEPT: usize = 64;

    pub fn push(&mut self, report: StepMetrics) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(report);
    }
}

impl Held {
    /// Whether this state continues `job`: the same training, model and data settings (the
    /// cluster's may change between generations).
    pub fn continues(&self, job: &JobConfig) -> bool {
        self.job.train == job.train && self.job.model == job.model && self.job.data == job.data
    }

    /// The state of `trainer`. State on a GPU is kept only when the generation ended well
    /// (`device_intact`, a regroup): after a failed NCCL call the device's stream is in an
    /// unknown state, so the job goes back to its checkpoint.
    pub fn of<B: TrainingBackend>(
        mut trainer: Trainer<B>,
        job: &JobConfig,
        reports: RecentReports,
        device_intact: bool,
    ) -> Option<Held> {
        if trainer.keeps_state_on_device() {
            if !device_intact {
                return None;
            }
            trainer.sync_host();
        }
        let step = trainer.state.step;
        Some(Held {
            job: job.clone(),
            step,
            params: trainer.params,
            optimizer: trainer.state,
            reports: reports
                .0
                .into_iter()
                .filter(|r| r.step <= step + 1)
                .collect(),
        })
    }
}

/// Parameters and optimizer state the generation starts from, the same on every rank: the
/// source rank's (rank 0 for the initial model and checkpoints, the survivor the
/// coordinator chose for a kept state), broadcast to all ranks. A kept state is used up
/// only once the broadcast succeeded, so a survivor whose next generation fails at once
/// still holds it.
pub(crate) fn starting_state(
    prepared: &Prepared,
    welcome: &Welcome,
    layout: &ParamLayout,
    ring: &mut dyn Collective,
    held: &mut Option<Held>,
) -> Result<(Vec<f32>, OptimizerState)> {
    let start_step = welcome.start_step;
    let mut optimizer = OptimizerState::new(layout.total);
    match &welcome.start {
        StartFrom::Init => {
            let mut params = prepared.initial.clone();
            ring.broadcast(&mut params, 0)?;
            Ok((params, optimizer))
        }
        StartFrom::Checkpoint(dir) => {
            let mut params = vec![0.0; layout.total];
            if welcome.rank == 0 {
                let loaded = checkpoint::load(dir, layout)?;
                if loaded.trainer.step != start_step || loaded.optimizer.step != start_step {
                    bail!("checkpoint {} is not at step {start_step}", dir.display());
                }
                tracing::info!(checkpoint = %dir.display(), step = start_step, "loaded");
                params = loaded.params;
                optimizer = loaded.optimizer;
            }
            ring.broadcast(&mut optimizer.exp_avg, 0)?;
            ring.broadcast(&mut optimizer.exp_avg_sq, 0)?;
            ring.broadcast(&mut params, 0)?;
            optimizer.step = start_step;
            Ok((params, optimizer))
        }
        &StartFrom::Peer { rank: source } => {
            let mut params = Vec::new();
            let mine = match held.as_mut() {
                Some(h) if welcome.rank == source => {
                    if h.step != start_step {
                        bail!(
                            "the coordinator asked for the state of step {start_step}, but this rank kept step {}",
                            h.step
                        );
                    }
                    (&mut h.params, &mut h.optimizer)
                }
                _ if welcome.rank == source => {
                    bail!("the coordinator asked for a kept state, but this rank kept none")
                }
                _ => {
                    params = vec![0.0; layout.total];
                    (&mut params, &mut optimizer)
                }
            };
            ring.broadcast(&mut mine.1.exp_avg, source)?;
            ring.broadcast(&mut mine.1.exp_avg_sq, source)?;
            ring.broadcast(mine.0, source)?;
            if welcome.rank == source {
                let h = held.take().expect("the source holds a state");
                tracing::info!(
                    step = start_step,
                    "continuing from the state this rank kept"
                );
                params = h.params;
                optimizer = h.optimizer;
            }
            optimizer.step = start_step;
            *held = None;
            Ok((params, optimizer))
        }
    }
}
