//! A generation's beginning and end: who the ranks are and where their state comes from
//! ([`starting_point`]), a lost rank, and an elastic job's regrouping.

use std::path::Path;
use std::time::Instant;

use crate::checkpoints;
use crate::job::Resume;
use crate::journal::Entry;
use crate::metrics::{Gather, MetricsLog};
use crate::protocol::{CoordinatorMsg, StartFrom, Welcome};
use crate::status::WorkerView;

use super::super::network::ConnId;
use super::reports::ProgressLine;
use super::{Action, Flow, Machine, Member, Phase, Stage};

/// Where a generation starts, given the newest committed checkpoint (`(step, dir)`) and the
/// steps of the states the joining workers kept (`held[rank]`, see
/// `JoinRequest::held_step`): the newest kept state that is at least as new as the
/// checkpoint and short of `max_steps`, broadcast by its holder; else the checkpoint; else
/// the initial model.
///
/// Why the newest kept state is consistent: an all-reduce gives every rank that completes
/// it the same bytes, and each rank applies the same update to the same state, so every
/// survivor that completed step `s` holds the state all ranks would have had after `s`.
/// When a rank was lost during the all-reduce of step `s`, some survivors may have
/// completed it while others failed and still hold `s - 1`; the ones that completed it are
/// right, and the others receive their state.
pub(crate) fn starting_point(
    checkpoint: Option<(u64, &Path)>,
    held: &[Option<u64>],
    max_steps: u64,
) -> (u64, StartFrom) {
    let from_checkpoint = checkpoint.map_or(0, |(step, _)| step);
    let newest_held = held
        .iter()
        .enumerate()
        .filter_map(|(rank, step)| step.map(|s| (s, rank)))
        .filter(|&(s, _)| s >= from_checkpoint && s < max_steps)
        // The newest step; among its holders, the lowest rank.
        .max_by_key(|&(s, rank)| (s, std::cmp::Reverse(rank)));
    match (newest_held, checkpoint) {
        (Some((step, rank)), _) => (step, StartFrom::Peer { rank }),
        (None, Some((step, dir))) => (step, StartFrom::Checkpoint(dir.to_path_buf())),
        (None, None) => (0, StartFrom::Init),
    }
}

impl Machine {
    /// How many workers a generation of an elastic job takes when `available` are there:
    /// the most, up to `world_size`, that split the global batch into whole micro-batches;
    /// `None` below `min_workers`.
    pub(super) fn generation_size(&self, available: usize) -> Option<usize> {
        let t = &self.job.train;
        (self.watchdog.min_workers..=available.min(self.world_size()))
            .rev()
            .find(|&w| {
                t.global_batch_size
                    .is_multiple_of(w as u64 * t.micro_batch_size)
            })
    }

    /// Workers joined a running elastic job that trains with fewer than `world_size`: asks
    /// the members to leave at a step they agree on (their vote rides in the all-reduce),
    /// keeping their state, so that everyone starts the next generation together.
    pub(super) fn regroup_if_it_grows(&mut self) {
        let available = self.members.len() + self.waiting.len();
        if self.regrouping
            || self.stopping.is_some()
            || self
                .generation_size(available)
                .is_none_or(|w| w <= self.members.len())
        {
            return;
        }
        let reason = format!(
            "{} worker(s) waiting to join the {} training",
            self.waiting.len(),
            self.members.len()
        );
        tracing::info!("regrouping at the next step: {reason}");
        self.regrouping = true;
        for m in 0..self.members.len() {
            self.send(
                self.members[m].conn,
                CoordinatorMsg::Regroup {
                    reason: reason.clone(),
                },
            );
        }
    }

    /// A member left its generation to regroup; once all have, back to rendezvous (where
    /// the waiting workers already are, and the members join again).
    pub(super) fn on_regrouped(&mut self, id: ConnId, rank: usize, step: u64) -> Flow {
        tracing::info!(rank, step, "rank left the generation to regroup");
        if let Some(conn) = self.conns.get_mut(&id) {
            // Its connection ends now; that is not a loss.
            conn.stage = Stage::New;
        }
        self.members[rank].view.done = true;
        if !self.members.iter().all(|m| m.view.done) {
            return Flow::Continue;
        }
        let _ = self.journal.append(&Entry::GenerationRegrouped {
            generation: self.generation,
            step,
        });
        self.members.clear();
        self.regrouping = false;
        self.phase = Phase::Rendezvous;
        self.last_progress = Instant::now();
        Flow::Continue
    }

    /// The world is complete (or, for an elastic job, large enough): the first `size`
    /// waiting workers become ranks in join order, the starting state is chosen
    /// ([`starting_point`]), then everyone is welcomed.
    pub(super) fn start_generation(&mut self, size: usize) -> Flow {
        self.generation += 1;
        // A fresh job's first generation takes nothing a worker kept: that state would be
        // from another run of the same job file.
        let take_held = self.generation > 1 || self.job.job.resume == Resume::Auto;
        let mut members = Vec::new();
        let mut peers = Vec::new();
        let mut held = Vec::new();
        let joining: Vec<ConnId> = self.waiting.drain(..size).collect();
        for (rank, &id) in joining.iter().enumerate() {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let Stage::Waiting(request) = std::mem::replace(&mut conn.stage, Stage::Member(rank))
            else {
                continue;
            };
            peers.push(request.collective_addr.clone());
            held.push(request.held_step.filter(|_| take_held));
            members.push(Member {
                conn: id,
                view: WorkerView {
                    rank: Some(rank),
                    host: request.host.clone(),
                    peer: conn.peer.to_string(),
                    last_heard: Instant::now(),
                    last_step: None,
                    gone: false,
                    done: false,
                },
            });
        }
        self.members = members;
        self.phase = Phase::Running;
        let world = self.members.len();
        self.steps = Gather::new(world);
        self.evals = Gather::new(world);
        self.last_progress = Instant::now();
        let checkpoint = self
            .resume_from
            .as_deref()
            .map(|dir| (self.start_step, dir));
        let (start_step, start) = starting_point(checkpoint, &held, self.job.train.max_steps);
        // The metrics log reads as one run: what an earlier generation logged past the step
        // this one continues from goes.
        match MetricsLog::open(&self.metrics_path, start_step) {
            Ok(log) => self.log = Some(log),
            Err(e) => return Flow::End(Err(e)),
        }
        self.progress = ProgressLine::new(start_step, self.job.train.max_steps);
        self.start_step = start_step;
        let source = match &start {
            StartFrom::Init => "the initial model".to_string(),
            StartFrom::Checkpoint(dir) => format!("checkpoint {}", dir.display()),
            StartFrom::Peer { rank } => format!("the state rank {rank} kept"),
        };
        tracing::info!(
            generation = self.generation,
            start_step,
            ?peers,
            "all workers joined; starting from {source}"
        );
        let _ = self.journal.append(&Entry::GenerationStarted {
            generation: self.generation,
            start_step,
            world_size: world,
            source,
            held: held.clone(),
        });
        for rank in 0..self.members.len() {
            let welcome = Welcome {
                rank,
                world_size: world,
                generation: self.generation,
                peers: peers.clone(),
                job: self.job.clone(),
                start_step,
                start: start.clone(),
            };
            self.send(
                self.members[rank].conn,
                CoordinatorMsg::Welcome(Box::new(welcome)),
            );
        }
        Flow::Continue
    }

    /// A rank of the running generation is gone, failed or hung: stop the generation and,
    /// unless the restart budget is spent, go back to rendezvous. The survivors rejoin by
    /// themselves with the state they kept, a dead worker is restarted by `launch` or the
    /// cluster's supervisor, and [`Machine::start_generation`] picks the starting state.
    pub(super) fn generation_failed(&mut self, reason: String) -> Flow {
        tracing::error!(generation = self.generation, "{reason}");
        if let Some(stopping) = &self.stopping {
            return Flow::End(Err(anyhow::anyhow!("{stopping}; then {reason}")));
        }
        let limit = self.watchdog.max_restarts;
        if !self.watchdog.may_restart(self.restarts) {
            let _ = self.journal.append(&Entry::JobStopped {
                reason: reason.clone(),
            });
            return Flow::End(Err(anyhow::anyhow!(
                "{reason}; giving up after {} restart(s) (cluster.max_restarts = {limit})",
                self.restarts
            )));
        }
        self.restarts += 1;
        let last_step = self.members.iter().filter_map(|m| m.view.last_step).max();
        let _ = self.journal.append(&Entry::GenerationFailed {
            generation: self.generation,
            reason: reason.clone(),
            restart: self.restarts,
            last_step,
        });
        self.stop_all(&reason, true);
        for member in std::mem::take(&mut self.members) {
            if self.conns.remove(&member.conn).is_some() {
                self.outbox.push(Action::Close(member.conn));
            }
        }
        // The fallback if no survivor kept its state: the newest checkpoint that is still
        // valid on disk.
        let ckpt_dir = checkpoints::checkpoints_dir(&self.job.job.run_dir);
        let found = match checkpoints::newest_valid(&ckpt_dir, &mut |p| tracing::warn!("{p}")) {
            Ok(found) => found,
            Err(e) => return Flow::End(Err(e)),
        };
        self.start_step = found.as_ref().map_or(0, |f| f.state.step);
        self.resume_from = found.map(|f| f.dir);
        let world = self.world_size();
        self.model_hash = None;
        self.regrouping = false;
        self.phase = Phase::Rendezvous;
        self.last_progress = Instant::now();
        let restarts = self.restarts;
        self.board.update(|s| s.restarts = restarts);
        tracing::warn!(
            "restart {restarts} of {limit}: waiting for {world} workers, then continuing from the newest state a survivor kept (or the checkpoint of step {})",
            self.start_step
        );
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_state_a_survivor_kept_is_where_the_next_generation_starts() {
        let dir = Path::new("/run/checkpoints/step-100");
        let ckpt = Some((100, dir));
        // Nobody kept anything: the checkpoint, or the initial model.
        assert_eq!(
            starting_point(ckpt, &[None, None], 1000),
            (100, StartFrom::Checkpoint(dir.into()))
        );
        assert_eq!(
            starting_point(None, &[None, None], 1000),
            (0, StartFrom::Init)
        );
        // A survivor at step 150 and a replacement: no step is redone.
        assert_eq!(
            starting_point(ckpt, &[None, Some(150)], 1000),
            (150, StartFrom::Peer { rank: 1 })
        );
        // The all-reduce of step 151 completed on rank 2 but failed on rank 0: rank 2's
        // state is everyone's.
        assert_eq!(
            starting_point(ckpt, &[Some(150), None, Some(151)], 1000),
            (151, StartFrom::Peer { rank: 2 })
        );
        // Several holders of the newest step: the lowest rank sends.
        assert_eq!(
            starting_point(ckpt, &[Some(151), Some(151)], 1000),
            (151, StartFrom::Peer { rank: 0 })
        );
        // A kept state older than the checkpoint (the coordinator was resumed from a newer
        // one) or at the end of the job is not used.
        assert_eq!(
            starting_point(ckpt, &[Some(90)], 1000),
            (100, StartFrom::Checkpoint(dir.into()))
        );
        assert_eq!(
            starting_point(None, &[Some(1000)], 1000),
            (0, StartFrom::Init)
        );
    }
}
