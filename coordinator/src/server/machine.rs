//! The state machine: the only code that changes the job's state. It never touches a
//! socket: handling an event changes the state and queues [`Action`]s (messages to send,
//! connections to close) in an outbox, which the network side performs (`network::serve`).
//! That keeps every decision testable without processes or sockets (see `tests`).
//! Where generations start, fail and regroup is in [`generations`]; what the ranks report
//! (steps, evaluations, checkpoints) in [`reports`].

mod generations;
mod reports;
#[cfg(test)]
mod tests;

use reports::ProgressLine;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;

use crate::job::{JobConfig, Resume};
use crate::journal::{self, Entry, Journal};
use crate::metrics::{Gather, MetricsLog};
use crate::protocol::{
    CoordinatorMsg, EvalMetrics, JoinRequest, PROTOCOL_VERSION, StepMetrics, WorkerMsg,
};
use crate::signals;
use crate::status::{StatusBoard, WorkerView};
use crate::token::tokens_equal;
use crate::watchdog::Watchdog;

use super::network::{ConnId, Event};
use super::{HELLO_TIMEOUT, world_size};

/// What the machine asks of the network side, performed in the order queued.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Action {
    /// Write a message to a connection. A worker that cannot take it is disconnected, and
    /// its reader thread then reports the close like any other loss.
    Send(ConnId, CoordinatorMsg),
    /// Shut a connection down; its reader thread then reports it closed.
    Close(ConnId),
}

/// What `Coordinator::bind` settled about the job, which the machine starts from.
pub(super) struct JobStart {
    pub(super) job: JobConfig,
    pub(super) token: String,
    pub(super) dataset_hash: String,
    pub(super) total_rows: u64,
    /// Steps completed by the checkpoint the first generation loads (0 for a fresh run).
    pub(super) start_step: u64,
    /// That checkpoint, when resuming.
    pub(super) resume_from: Option<PathBuf>,
    /// Set to stop the job as SIGINT/SIGTERM would.
    pub(super) interrupt: Arc<AtomicBool>,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Connected; no valid Hello yet.
    New,
    /// Hello accepted, job offered; waiting for its Join.
    Offered,
    /// Joined; waiting for the rest of the world.
    Waiting(Box<JoinRequest>),
    /// Training as this rank.
    Member(usize),
}

struct Conn {
    peer: SocketAddr,
    stage: Stage,
    since: Instant,
}

/// One rank of the running generation.
struct Member {
    conn: ConnId,
    view: WorkerView,
}

enum Phase {
    Rendezvous,
    Running,
}

/// What handling an event decided.
enum Flow {
    Continue,
    End(Result<()>),
}

pub(super) struct Machine {
    job: JobConfig,
    token: String,
    dataset_hash: String,
    total_rows: u64,
    start_step: u64,
    interrupt: Arc<AtomicBool>,
    board: Arc<StatusBoard>,
    /// Opened when a generation starts, at the step it starts from.
    log: Option<MetricsLog>,
    conns: HashMap<ConnId, Conn>,
    phase: Phase,
    /// Joined connections, in join order (rank order once the world is complete).
    waiting: Vec<ConnId>,
    /// Model fingerprint of the first worker to join; later ones must match it.
    model_hash: Option<String>,
    generation: u64,
    members: Vec<Member>,
    steps: Gather<StepMetrics>,
    evals: Gather<EvalMetrics>,
    last_progress: Instant,
    progress: ProgressLine,
    metrics_path: PathBuf,
    journal: Journal,
    /// The newest committed checkpoint when the generation was (re)started, at step
    /// `start_step`: where the next generation starts if no worker kept a newer state.
    resume_from: Option<PathBuf>,
    /// Generations restarted by this coordinator process.
    restarts: u32,
    watchdog: Watchdog,
    /// Set once the job was interrupted: the workers are checkpointing before they stop.
    stopping: Option<String>,
    /// Why the newest checkpoint could not be written (a full disk, say), until one is
    /// committed again: training goes on, but a job whose end is not saved fails.
    unsaved: Option<String>,
    /// Set while the members are asked to leave at an agreed step so that waiting workers
    /// can join (an elastic job growing back).
    regrouping: bool,
    /// What handling events decided to send and close, until the network side takes it.
    outbox: Vec<Action>,
}

impl Machine {
    pub(super) fn new(
        c: JobStart,
        metrics_path: PathBuf,
        board: Arc<StatusBoard>,
    ) -> Result<Machine> {
        let world = world_size(&c.job);
        let history = journal::read(&c.job.job.run_dir)?;
        if let Some(committed) = journal::last_committed(&history)
            && committed > c.start_step
            && c.job.job.resume == Resume::Auto
        {
            tracing::warn!(
                "the journal records a committed checkpoint at step {committed}, but the newest usable one is at step {}; \
                 the newer ones were damaged or removed",
                c.start_step
            );
        }
        let restarts = 0;
        let mut journal = Journal::open(&c.job.job.run_dir)?;
        journal.append(&Entry::CoordinatorStarted {
            start_step: c.start_step,
            resumed_from: c.resume_from.clone(),
        })?;
        board.update(|s| {
            s.restarts = restarts;
            s.step = (c.start_step > 0).then_some(c.start_step);
        });
        Ok(Machine {
            token: c.token,
            dataset_hash: c.dataset_hash,
            total_rows: c.total_rows,
            start_step: c.start_step,
            interrupt: c.interrupt,
            board,
            log: None,
            conns: HashMap::new(),
            phase: Phase::Rendezvous,
            waiting: Vec::new(),
            model_hash: None,
            generation: 0,
            members: Vec::new(),
            steps: Gather::new(world),
            evals: Gather::new(world),
            last_progress: Instant::now(),
            progress: ProgressLine::new(c.start_step, c.job.train.max_steps),
            metrics_path,
            journal,
            resume_from: c.resume_from,
            restarts,
            watchdog: Watchdog::from_job(&c.job.cluster),
            stopping: None,
            unsaved: None,
            regrouping: false,
            outbox: Vec::new(),
            job: c.job,
        })
    }

    fn world_size(&self) -> usize {
        world_size(&self.job)
    }

    /// Whether the checkpoint the job resumes from is already at `train.max_steps`: then
    /// there is nothing to run (said in the log).
    pub(super) fn finished_already(&self) -> bool {
        let done = self.start_step >= self.job.train.max_steps;
        if done {
            tracing::info!(
                "the job already reached train.max_steps = {} at its last checkpoint; nothing to do",
                self.job.train.max_steps
            );
        }
        done
    }

    /// Handles `event` (if one came), then checks timeouts and signals as of `now`, and
    /// publishes the state. `Some(outcome)` once the job has ended; the actions to perform
    /// are in the outbox ([`Machine::take_outbox`]) either way.
    pub(super) fn advance(&mut self, event: Option<Event>, now: Instant) -> Option<Result<()>> {
        let flow = match event {
            Some(event) => self.handle(event),
            None => Flow::Continue,
        };
        let flow = match flow {
            Flow::Continue => self.tick(now),
            end => end,
        };
        match flow {
            Flow::Continue => {
                self.publish();
                None
            }
            Flow::End(outcome) => Some(self.end(outcome)),
        }
    }

    /// Ends the job with `outcome`: publishes the state and, on failure, tells every member
    /// to stop for good.
    pub(super) fn end(&mut self, outcome: Result<()>) -> Result<()> {
        self.publish();
        if let Err(e) = &outcome {
            self.stop_all(&format!("{e:#}"), false);
        }
        outcome
    }

    /// The actions queued since the last call, oldest first.
    pub(super) fn take_outbox(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Connected { conn, peer } => {
                tracing::debug!(%peer, "connection");
                self.conns.insert(
                    conn,
                    Conn {
                        peer,
                        stage: Stage::New,
                        since: Instant::now(),
                    },
                );
                Flow::Continue
            }
            Event::Message { conn, msg } => self.on_message(conn, msg),
            Event::Closed { conn, reason } => self.on_closed(conn, reason),
        }
    }

    fn on_message(&mut self, id: ConnId, msg: WorkerMsg) -> Flow {
        let Some(conn) = self.conns.get(&id) else {
            return Flow::Continue;
        };
        let stage = conn.stage.clone();
        if let Stage::Member(rank) = stage {
            self.members[rank].view.last_heard = Instant::now();
        }
        match (stage, msg) {
            (
                Stage::New,
                WorkerMsg::Hello {
                    token,
                    protocol_version,
                },
            ) => self.on_hello(id, &token, protocol_version),
            (Stage::Offered, WorkerMsg::Join(request)) => self.on_join(id, request),
            (Stage::Waiting(_) | Stage::Offered, WorkerMsg::Heartbeat) => Flow::Continue,
            (Stage::Member(_), WorkerMsg::Heartbeat) => Flow::Continue,
            (Stage::Member(rank), WorkerMsg::StepReport(m)) => self.on_step(rank, m),
            (Stage::Member(rank), WorkerMsg::EvalReport(m)) => self.on_eval(rank, m),
            (Stage::Member(0), WorkerMsg::Bootstrap { blob }) => {
                tracing::info!(
                    bytes = blob.len(),
                    "relaying rank 0's collective bootstrap to all ranks"
                );
                for rank in 0..self.members.len() {
                    self.send(
                        self.members[rank].conn,
                        CoordinatorMsg::Bootstrap { blob: blob.clone() },
                    );
                }
                Flow::Continue
            }
            (Stage::Member(0), WorkerMsg::Checkpointed { step, dir, seconds }) => {
                self.on_checkpointed(step, dir, seconds)
            }
            (Stage::Member(0), WorkerMsg::CheckpointFailed { step, reason }) => {
                tracing::error!(
                    step,
                    "checkpoint failed, the previous committed one stays: {reason}"
                );
                let failure =
                    format!("the checkpoint of step {step} could not be written: {reason}");
                self.board.update(|s| s.error = Some(failure.clone()));
                self.unsaved = Some(failure);
                self.journal_append(&Entry::CheckpointFailed { step, reason })
            }
            (Stage::Member(rank), WorkerMsg::Done) => {
                tracing::info!(rank, "rank done");
                self.members[rank].view.done = true;
                if !self.members.iter().all(|m| m.view.done) {
                    return Flow::Continue;
                }
                match self.stopping.clone() {
                    Some(reason) => {
                        let at = self.board.update(|s| s.last_checkpoint);
                        let _ = self.journal.append(&Entry::JobStopped {
                            reason: reason.clone(),
                        });
                        let saved = match at {
                            Some(step) => format!(
                                "the checkpoint of step {step} is committed; continue with --resume"
                            ),
                            None => "no checkpoint was committed".to_string(),
                        };
                        Flow::End(Err(anyhow::anyhow!("{reason}; {saved}")))
                    }
                    None => match self.unsaved.clone() {
                        // The end of the job is not saved: not a success.
                        Some(failure) => {
                            let at = self.board.update(|s| s.last_checkpoint);
                            let committed = match at {
                                Some(step) => {
                                    format!("the newest committed checkpoint is step {step}")
                                }
                                None => "no checkpoint was committed".to_string(),
                            };
                            let reason = format!(
                                "{failure}; {committed}; make room in job.run_dir and continue with --resume"
                            );
                            let _ = self.journal.append(&Entry::JobStopped {
                                reason: reason.clone(),
                            });
                            Flow::End(Err(anyhow::anyhow!(reason)))
                        }
                        None => {
                            let _ = self.journal.append(&Entry::JobFinished {
                                step: self.job.train.max_steps,
                            });
                            Flow::End(Ok(()))
                        }
                    },
                }
            }
            (Stage::Member(rank), WorkerMsg::Regrouped { step }) => {
                self.on_regrouped(id, rank, step)
            }
            (Stage::Member(rank), WorkerMsg::Failed { reason }) => {
                let host = self.members[rank].view.host.clone();
                self.generation_failed(format!("rank {rank} ({host}) failed: {reason}"))
            }
            (stage, msg) => {
                let peer = self.conns.get(&id).map(|c| c.peer);
                let what = format!("{msg:?}");
                let what = what
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("message")
                    .to_string();
                tracing::warn!(
                    ?peer,
                    ?stage,
                    "protocol violation: unexpected {what}; dropping the connection"
                );
                self.refuse(
                    id,
                    &format!("unexpected {what} message at this point of the protocol"),
                );
                Flow::Continue
            }
        }
    }

    fn on_hello(&mut self, id: ConnId, token: &str, version: u32) -> Flow {
        let reason = if version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {version} does not match the coordinator's {PROTOCOL_VERSION}; run the same bertrain build on every node"
            ))
        } else if !tokens_equal(token, &self.token) {
            Some("wrong job token; pass the job's token file with --token-file".to_string())
        } else if matches!(self.phase, Phase::Running)
            && (self.members.len() + self.waiting.len() >= self.world_size()
                || self.stopping.is_some())
        {
            Some(format!(
                "the job is already running with all {} workers",
                self.world_size()
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            self.refuse(id, &reason);
            return Flow::Continue;
        }
        let job = Box::new(self.job.clone());
        self.send(id, CoordinatorMsg::JobOffer { job });
        if let Some(c) = self.conns.get_mut(&id) {
            c.stage = Stage::Offered;
        }
        Flow::Continue
    }

    fn on_join(&mut self, id: ConnId, request: JoinRequest) -> Flow {
        if request.dataset_hash != self.dataset_hash {
            let reason = format!(
                "dataset differs from the job's: worker has dataset hash {}, the job's manifest {} has {}; give every worker the same dataset",
                request.dataset_hash,
                self.job.data.manifest.display(),
                self.dataset_hash
            );
            self.refuse(id, &reason);
            return Flow::Continue;
        }
        match &self.model_hash {
            Some(expected) if *expected != request.model_hash => {
                let reason = format!(
                    "model differs from the first worker's: model hash {} vs {}; give every worker the same model files",
                    request.model_hash, expected
                );
                self.refuse(id, &reason);
                return Flow::Continue;
            }
            Some(_) => {}
            None => self.model_hash = Some(request.model_hash.clone()),
        }
        let world_size = self.world_size();
        let Some(conn) = self.conns.get_mut(&id) else {
            return Flow::Continue;
        };
        tracing::info!(
            peer = %conn.peer, host = %request.host, joined = self.waiting.len() + 1, world_size,
            "worker joined"
        );
        conn.stage = Stage::Waiting(Box::new(request));
        self.waiting.push(id);
        match self.phase {
            Phase::Rendezvous if self.waiting.len() == self.world_size() => {
                self.start_generation(self.waiting.len())
            }
            Phase::Running => {
                self.regroup_if_it_grows();
                Flow::Continue
            }
            Phase::Rendezvous => Flow::Continue,
        }
    }

    fn on_closed(&mut self, id: ConnId, reason: Option<String>) -> Flow {
        let Some(conn) = self.conns.remove(&id) else {
            return Flow::Continue;
        };
        let why = reason.unwrap_or_else(|| "connection closed".to_string());
        match conn.stage {
            Stage::Member(rank) => {
                let member = &mut self.members[rank];
                member.view.gone = true;
                if member.view.done {
                    return Flow::Continue;
                }
                let host = member.view.host.clone();
                self.generation_failed(format!("lost rank {rank} ({host}, {}): {why}", conn.peer))
            }
            Stage::Waiting(request) => {
                self.waiting.retain(|&w| w != id);
                if self.waiting.is_empty() {
                    self.model_hash = None;
                }
                tracing::warn!(peer = %conn.peer, host = %request.host, "a waiting worker left before the job started: {why}");
                Flow::Continue
            }
            Stage::New | Stage::Offered => {
                tracing::debug!(peer = %conn.peer, "connection ended before joining: {why}");
                Flow::Continue
            }
        }
    }

    fn journal_append(&mut self, entry: &Entry) -> Flow {
        match self.journal.append(entry) {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::End(Err(e)),
        }
    }

    fn tick(&mut self, now: Instant) -> Flow {
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.stage == Stage::New && now.saturating_duration_since(c.since) > HELLO_TIMEOUT
            })
            .map(|(&id, _)| id)
            .collect();
        self.outbox.extend(silent.into_iter().map(Action::Close));
        let since_progress = now.saturating_duration_since(self.last_progress);
        let signal = signals::received();
        let interrupted = signal.is_some() || self.interrupt.load(Ordering::SeqCst);
        if interrupted {
            let reason = match signal {
                Some(s) => format!("interrupted by signal {s}"),
                None => "interrupted".to_string(),
            };
            let running = matches!(self.phase, Phase::Running);
            if !running || signals::count() > 1 {
                let _ = self.journal.append(&Entry::JobStopped {
                    reason: reason.clone(),
                });
                return Flow::End(Err(anyhow::anyhow!(reason)));
            }
            if self.stopping.is_none() {
                tracing::warn!(
                    "{reason}: asking the workers to checkpoint and stop (signal again to stop at once)"
                );
                for m in 0..self.members.len() {
                    self.send(
                        self.members[m].conn,
                        CoordinatorMsg::CheckpointAndStop {
                            reason: reason.clone(),
                        },
                    );
                }
                self.stopping = Some(reason);
            }
        }
        if matches!(self.phase, Phase::Running) {
            let limit = self.watchdog.step_timeout.as_secs_f64();
            if self.watchdog.stalled(since_progress) {
                let behind: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        format!(
                            "rank {} at step {:?}",
                            m.view.rank.unwrap_or(0),
                            m.view.last_step
                        )
                    })
                    .collect();
                return self.generation_failed(format!(
                    "no step completed for {limit} s (cluster.step_timeout_s; a hung collective or a stuck worker?): {}",
                    behind.join(", ")
                ));
            }
        } else if self.generation > 0 {
            // An elastic job goes on with the workers it has once the others had their
            // time to come back.
            let waited = since_progress;
            if waited >= self.watchdog.rejoin_timeout
                && let Some(size) = self.generation_size(self.waiting.len())
            {
                tracing::warn!(
                    "{} of {} workers are back after {:.0} s (cluster.rejoin_timeout_s); going on with {size}",
                    self.waiting.len(),
                    self.world_size(),
                    waited.as_secs_f64()
                );
                return self.start_generation(size);
            }
            // After a failed generation the job waits for its workers to come back, but
            // not forever: nobody may be left to restart them.
            let limit = self.watchdog.step_timeout.as_secs_f64();
            if self.watchdog.stalled(since_progress) {
                return Flow::End(Err(anyhow::anyhow!(
                    "only {} of {} workers rejoined within {limit} s (cluster.step_timeout_s) after the last restart; \
                     restart the missing workers and run the coordinator again with --resume",
                    self.waiting.len(),
                    self.world_size()
                )));
            }
        }
        Flow::Continue
    }

    /// Queues a message to a connection that is still open (as far as the machine knows).
    fn send(&mut self, id: ConnId, msg: CoordinatorMsg) {
        if self.conns.contains_key(&id) {
            self.outbox.push(Action::Send(id, msg));
        }
    }

    /// Tells a connection why it is turned away, then closes it.
    fn refuse(&mut self, id: ConnId, reason: &str) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        tracing::warn!(peer = %conn.peer, "refused a worker: {reason}");
        self.send(
            id,
            CoordinatorMsg::Refused {
                reason: reason.to_string(),
            },
        );
        self.outbox.push(Action::Close(id));
    }

    fn stop_all(&mut self, reason: &str, rejoin: bool) {
        let ids: Vec<ConnId> = self.members.iter().map(|m| m.conn).collect();
        for id in ids {
            self.send(
                id,
                CoordinatorMsg::Stop {
                    reason: reason.to_string(),
                    rejoin,
                },
            );
        }
    }

    pub(super) fn publish(&self) {
        let (state, workers) = match self.phase {
            Phase::Rendezvous => {
                let workers = self
                    .waiting
                    .iter()
                    .filter_map(|id| self.conns.get(id))
                    .filter_map(|c| match &c.stage {
                        Stage::Waiting(r) => Some(WorkerView {
                            rank: None,
                            host: r.host.clone(),
                            peer: c.peer.to_string(),
                            last_heard: Instant::now(),
                            last_step: None,
                            gone: false,
                            done: false,
                        }),
                        _ => None,
                    })
                    .collect();
                ("waiting", workers)
            }
            Phase::Running => (
                "running",
                self.members.iter().map(|m| m.view.clone()).collect(),
            ),
        };
        let generation = self.generation;
        self.board.update(|s| {
            s.state = state;
            s.workers = workers;
            s.generation = generation;
        });
    }
}
