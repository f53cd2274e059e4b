//! `bertrain coordinator`: runs one job.
//!
//! Shape: an accept thread and one reader thread per connection turn the network into
//! [`Event`]s on a single channel; one state-machine loop ([`Machine`]) consumes them and
//! is the only code that changes the job's state or writes to workers. Nothing is shared
//! but the channel and the status board the HTTP server reads.
//!
//! States: `Rendezvous` (collecting `world_size` joins) -> `Running` (one generation of
//! workers training) -> end. A lost, failed or hung worker ends the generation
//! ([`Machine::generation_failed`]): the survivors are told to rejoin, keeping their
//! training state, the state goes back to `Rendezvous`, and the next generation starts
//! from the newest state a survivor kept, or else from the newest committed checkpoint
//! ([`starting_point`]), up to `cluster.max_restarts` times. SIGINT/SIGTERM asks the workers to checkpoint and
//! stop; a second signal stops at once. Everything that happens is written to the journal.

use std::collections::HashMap;
use std::io::{BufReader, ErrorKind};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bertrain_dataprep::Manifest;

use crate::checkpoints::{self, Found};
use crate::faults;
use crate::http;
use crate::job::{JobConfig, Override, Resume};
use crate::journal::{self, Entry, Journal};
use crate::metrics::{Gather, MetricsLog, merge_evals, merge_steps};
use crate::protocol::{
    CoordinatorMsg, EvalMetrics, JoinRequest, PROTOCOL_VERSION, StartFrom, StepMetrics, Welcome,
    WorkerMsg, read_frame, write_frame,
};
use crate::signals;
use crate::status::{StatusBoard, WorkerView};
use crate::token::{ensure_token, tokens_equal};
use crate::watchdog::Watchdog;

/// How often the state loop wakes without events to check timeouts and signals.
const TICK: Duration = Duration::from_millis(200);
/// A worker that does not take a message within this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections beyond this are closed as they come: each costs a thread, and a flood
/// of them must not starve the job's own.
const MAX_CONNECTIONS: usize = 256;
/// A connection that has not said a valid hello within this long is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// `bertrain coordinator`.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// The job file (TOML).
    #[arg(long, value_name = "JOB.toml")]
    pub config: PathBuf,
    /// Address to listen on for workers [default: the job's cluster.coordinator].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Override a job key, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<Override>,
    /// Continue from the newest committed checkpoint (same as `[job] resume = "auto"`).
    #[arg(long)]
    pub resume: bool,
}

/// Entry point of `bertrain coordinator`: loads the job, runs it, returns its outcome.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    signals::install()?;
    let job = load_job(&args.config, &args.overrides, args.resume)?;
    let listen = listen_address(args.listen, &job);
    let coordinator = Coordinator::bind(job, &listen)?;
    coordinator.run()
}

/// Where the coordinator listens for workers: `--listen`, else `cluster.coordinator`.
pub(crate) fn listen_address(listen: Option<String>, job: &JobConfig) -> String {
    listen.unwrap_or_else(|| job.cluster.coordinator.clone())
}

/// Removes the checkpoints beyond `checkpoint.keep_last` from the run's `checkpoints/`.
pub(crate) fn prune_checkpoints(job: &JobConfig) -> Result<Vec<PathBuf>> {
    let dir = checkpoints::checkpoints_dir(&job.job.run_dir);
    checkpoints::prune(&dir, job.checkpoint.keep_last as usize)
}

/// Workers the job waits for before it starts (`cluster.world_size`).
pub(crate) fn world_size(job: &JobConfig) -> usize {
    job.cluster.world_size as usize
}

/// Loads the job file with `--set` overrides and `--resume` applied.
pub fn load_job(config: &Path, overrides: &[Override], resume: bool) -> Result<JobConfig> {
    let mut overrides = overrides.to_vec();
    if resume {
        overrides.push("job.resume=auto".parse()?);
    }
    JobConfig::load(config, &overrides)
}

/// A job whose data has been checked and whose sockets are bound, ready to [`run`](Self::run).
pub struct Coordinator {
    job: JobConfig,
    listener: TcpListener,
    http_listener: TcpListener,
    token: String,
    dataset_hash: String,
    total_rows: u64,
    start_step: u64,
    /// The checkpoint the first generation loads, when resuming.
    resume_from: Option<PathBuf>,
    interrupt: Arc<AtomicBool>,
}

impl Coordinator {
    /// Verifies the dataset against its manifest, settles where the run starts, makes sure
    /// the token exists, and binds the worker and HTTP ports. Fails before any worker is
    /// accepted if anything is wrong.
    pub fn bind(job: JobConfig, listen: &str) -> Result<Coordinator> {
        let manifest = Manifest::load_verified(&job.data.manifest)?;
        if let Some(validation) = &job.data.validation_manifest {
            Manifest::load_verified(validation)?;
        }
        if manifest.total_rows() == 0 {
            bail!(
                "dataset manifest {} lists no rows; re-run `bertrain dataprep`",
                job.data.manifest.display()
            );
        }
        std::fs::create_dir_all(&job.job.run_dir)
            .with_context(|| format!("creating run_dir {}", job.job.run_dir.display()))?;
        let resumed = resume_point(&job, &manifest.content_hash())?;
        let token = ensure_token(&job)?;
        let listener = TcpListener::bind(listen).with_context(|| {
            format!("listening for workers on {listen} (set --listen or cluster.coordinator)")
        })?;
        let http_addr = job.http_address(listen)?;
        let http_listener = TcpListener::bind(&http_addr)
            .with_context(|| format!("listening for HTTP on {http_addr} (set cluster.http)"))?;
        Ok(Coordinator {
            dataset_hash: manifest.content_hash(),
            total_rows: manifest.total_rows(),
            job,
            listener,
            http_listener,
            token,
            start_step: resumed.as_ref().map_or(0, |f| f.state.step),
            resume_from: resumed.map(|f| f.dir),
            interrupt: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Where workers connect.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where the HTTP status server listens.
    pub fn http_addr(&self) -> Result<SocketAddr> {
        Ok(self.http_listener.local_addr()?)
    }

    /// Setting this flag stops the job as SIGINT/SIGTERM would (for embedding and tests).
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    /// Runs the job to its end: `Ok` when every rank said Done, an error saying why otherwise.
    pub fn run(self) -> Result<()> {
        let addr = self.local_addr()?;
        let http_addr = self.http_addr()?;
        tracing::info!(
            job = %self.job.job.name, %addr, http = %http_addr, world_size = self.job.cluster.world_size,
            "coordinator listening; waiting for workers"
        );
        let board = Arc::new(StatusBoard::new(
            &self.job.job.name,
            self.job.cluster.world_size as usize,
            self.job.train.max_steps,
            self.job.cluster.heartbeat_interval_s,
        ));
        let shutdown = Arc::new(AtomicBool::new(false));
        let (events, inbox) = mpsc::channel();
        let silence = Watchdog::from_job(&self.job.cluster).silence;
        let listener = self
            .listener
            .try_clone()
            .context("cloning the listening socket")?;
        let accept_shutdown = shutdown.clone();
        let accept = thread::spawn(move || accept_loop(listener, events, silence, accept_shutdown));
        let http_server = http::spawn(
            self.http_listener
                .try_clone()
                .context("cloning the HTTP socket")?,
            board.clone(),
            shutdown.clone(),
        );

        let metrics_path = self.job.job.run_dir.join("metrics.jsonl");
        let outcome = Machine::new(&self, metrics_path, board.clone()).and_then(|mut machine| {
            let outcome = machine.run(&inbox);
            machine.close_all();
            outcome
        });
        board.update(|s| {
            s.state = if outcome.is_ok() {
                "finished"
            } else {
                "failed"
            };
            s.error = outcome.as_ref().err().map(|e| format!("{e:#}"));
        });

        // Wake the blocking accepts so their threads see the shutdown flag and exit.
        shutdown.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        let _ = TcpStream::connect_timeout(&http_addr, Duration::from_secs(1));
        let _ = accept.join();
        let _ = http_server.join();
        match &outcome {
            Ok(()) => tracing::info!(job = %self.job.job.name, "job finished"),
            Err(e) => tracing::error!(job = %self.job.job.name, "job failed: {e:#}"),
        }
        outcome
    }
}

/// Where the run starts: `None` for a fresh run, or the newest valid committed checkpoint.
///
/// A fresh job (`resume = "never"`) refuses a `run_dir` that already holds a run, so no
/// earlier metrics or checkpoints are mixed up with the new run's. With `resume = "auto"`
/// a damaged or incomplete newest checkpoint is reported and the previous one used; a
/// checkpoint of other training data, or of another global batch, is refused.
pub(crate) fn resume_point(job: &JobConfig, dataset_hash: &str) -> Result<Option<Found>> {
    let run_dir = &job.job.run_dir;
    let ckpt_dir = checkpoints::checkpoints_dir(run_dir);
    let has_run =
        run_dir.join("metrics.jsonl").exists() || !checkpoints::step_dirs(&ckpt_dir)?.is_empty();
    if job.job.resume == Resume::Never {
        if has_run {
            bail!(
                "run_dir {} already holds a run; pass --resume (or set [job] resume = \"auto\") to continue it, or choose another [job] run_dir",
                run_dir.display()
            );
        }
        return Ok(None);
    }
    let found = checkpoints::newest_valid(&ckpt_dir, &mut |problem| tracing::warn!("{problem}"))?;
    let Some(found) = found else {
        if has_run {
            tracing::warn!(
                "run_dir {} has no usable checkpoint; starting from step 0",
                run_dir.display()
            );
        }
        return Ok(None);
    };
    let state = &found.state;
    if state.dataset_hash != dataset_hash {
        bail!(
            "checkpoint {} was trained on other data (dataset hash {}, the job's is {dataset_hash}); point data.manifest at the run's dataset",
            found.dir.display(),
            state.dataset_hash
        );
    }
    if state.global_batch_size != job.train.global_batch_size {
        bail!(
            "checkpoint {} was trained with train.global_batch_size = {}, the job says {}; a resume keeps the global batch (the world size may change)",
            found.dir.display(),
            state.global_batch_size,
            job.train.global_batch_size
        );
    }
    tracing::info!(checkpoint = %found.dir.display(), step = state.step, "resuming");
    Ok(Some(found))
}

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

/// Decides when a training progress line is due: the first step, then at most one every
/// [`ProgressLine::EVERY`], and the last step; carries the step rate since the start.
struct ProgressLine {
    started: Instant,
    first_step: u64,
    last_step: u64,
    last_line: Option<Instant>,
}

impl ProgressLine {
    const EVERY: Duration = Duration::from_secs(5);

    fn new(first_step: u64, last_step: u64) -> ProgressLine {
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

/// A connection, identified for the lifetime of the coordinator.
type ConnId = u64;

/// What the network tells the state loop.
enum Event {
    Connected {
        conn: ConnId,
        stream: TcpStream,
        peer: SocketAddr,
    },
    Message {
        conn: ConnId,
        msg: WorkerMsg,
    },
    /// The connection ended: `None` for a clean close, else why it broke.
    Closed {
        conn: ConnId,
        reason: Option<String>,
    },
}

fn accept_loop(
    listener: TcpListener,
    events: Sender<Event>,
    silence: Duration,
    shutdown: Arc<AtomicBool>,
) {
    let mut next_id: ConnId = 0;
    let open = Arc::new(AtomicUsize::new(0));
    let (mut turned_away, mut reported) = (0u64, Instant::now());
    for stream in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a connection failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(stream);
            turned_away += 1;
            if reported.elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    "{turned_away} connection(s) closed at once: {MAX_CONNECTIONS} are open already"
                );
                (turned_away, reported) = (0, Instant::now());
            }
            continue;
        }
        next_id += 1;
        let conn = next_id;
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        // The read timeout is the heartbeat check: a worker silent this long is dead.
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(silence)))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
            .and_then(|()| stream.try_clone());
        let reader = match setup {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, "setting up a connection failed: {e}");
                continue;
            }
        };
        if events
            .send(Event::Connected { conn, stream, peer })
            .is_err()
        {
            return;
        }
        let events = events.clone();
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        thread::spawn(move || {
            read_loop(conn, reader, events, silence);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn read_loop(conn: ConnId, stream: TcpStream, events: Sender<Event>, silence: Duration) {
    let mut reader = BufReader::new(stream);
    loop {
        let event = match read_frame::<WorkerMsg>(&mut reader) {
            Ok(Some(msg)) => Event::Message { conn, msg },
            Ok(None) => Event::Closed { conn, reason: None },
            Err(e) => Event::Closed {
                conn,
                reason: Some(describe_read_error(&e, silence)),
            },
        };
        let last = matches!(event, Event::Closed { .. });
        if events.send(event).is_err() || last {
            return;
        }
    }
}

fn describe_read_error(err: &anyhow::Error, silence: Duration) -> String {
    let timed_out = err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    if timed_out {
        format!(
            "silent for {:.1} s (no heartbeat within cluster.heartbeat_timeout_s)",
            silence.as_secs_f64()
        )
    } else {
        format!("{err:#}")
    }
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
    stream: TcpStream,
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

struct Machine {
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
}

impl Machine {
    fn new(c: &Coordinator, metrics_path: PathBuf, board: Arc<StatusBoard>) -> Result<Machine> {
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
            job: c.job.clone(),
            token: c.token.clone(),
            dataset_hash: c.dataset_hash.clone(),
            total_rows: c.total_rows,
            start_step: c.start_step,
            interrupt: c.interrupt.clone(),
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
            resume_from: c.resume_from.clone(),
            restarts,
            watchdog: Watchdog::from_job(&c.job.cluster),
            stopping: None,
            unsaved: None,
            regrouping: false,
        })
    }

    fn world_size(&self) -> usize {
        world_size(&self.job)
    }

    fn run(&mut self, inbox: &Receiver<Event>) -> Result<()> {
        if self.start_step >= self.job.train.max_steps {
            tracing::info!(
                "the job already reached train.max_steps = {} at its last checkpoint; nothing to do",
                self.job.train.max_steps
            );
            return Ok(());
        }
        self.publish();
        loop {
            let flow = match inbox.recv_timeout(TICK) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => {
                    Flow::End(Err(anyhow::anyhow!("the listener stopped")))
                }
            };
            let flow = match flow {
                Flow::Continue => self.tick(),
                end => end,
            };
            self.publish();
            if let Flow::End(outcome) = flow {
                if let Err(e) = &outcome {
                    self.stop_all(&format!("{e:#}"), false);
                }
                return outcome;
            }
        }
    }

    fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Connected { conn, stream, peer } => {
                tracing::debug!(%peer, "connection");
                self.conns.insert(
                    conn,
                    Conn {
                        stream,
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
                        &CoordinatorMsg::Bootstrap { blob: blob.clone() },
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
        if self.send(id, &CoordinatorMsg::JobOffer { job }) {
            if let Some(c) = self.conns.get_mut(&id) {
                c.stage = Stage::Offered;
            }
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

    /// How many workers a generation of an elastic job takes when `available` are there:
    /// the most, up to `world_size`, that split the global batch into whole micro-batches;
    /// `None` below `min_workers`.
    fn generation_size(&self, available: usize) -> Option<usize> {
        let t = &self.job.train;
        (self.watchdog.min_workers..=available.min(self.world_size()))
            .rev()
            .find(|&w| t.global_batch_size % (w as u64 * t.micro_batch_size) == 0)
    }

    /// Workers joined a running elastic job that trains with fewer than `world_size`: asks
    /// the members to leave at a step they agree on (their vote rides in the all-reduce),
    /// keeping their state, so that everyone starts the next generation together.
    fn regroup_if_it_grows(&mut self) {
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
                &CoordinatorMsg::Regroup {
                    reason: reason.clone(),
                },
            );
        }
    }

    /// A member left its generation to regroup; once all have, back to rendezvous (where
    /// the waiting workers already are, and the members join again).
    fn on_regrouped(&mut self, id: ConnId, rank: usize, step: u64) -> Flow {
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
    fn start_generation(&mut self, size: usize) -> Flow {
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
                &CoordinatorMsg::Welcome(Box::new(welcome)),
            );
        }
        Flow::Continue
    }

    fn on_step(&mut self, rank: usize, m: StepMetrics) -> Flow {
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
        if let Err(e) = log.write_step(&merged) {
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

    fn on_eval(&mut self, rank: usize, m: EvalMetrics) -> Flow {
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

    /// Rank 0 sealed a checkpoint: record it, point `latest` at it, drop old ones.
    fn on_checkpointed(&mut self, step: u64, dir: PathBuf, seconds: f64) -> Flow {
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

    fn journal_append(&mut self, entry: &Entry) -> Flow {
        match self.journal.append(entry) {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::End(Err(e)),
        }
    }

    /// A rank of the running generation is gone, failed or hung: stop the generation and,
    /// unless the restart budget is spent, go back to rendezvous. The survivors rejoin by
    /// themselves with the state they kept, a dead worker is restarted by `launch` or the
    /// cluster's supervisor, and [`Machine::start_generation`] picks the starting state.
    fn generation_failed(&mut self, reason: String) -> Flow {
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
            if let Some(conn) = self.conns.remove(&member.conn) {
                let _ = conn.stream.shutdown(Shutdown::Both);
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

    fn tick(&mut self) -> Flow {
        for conn in self.conns.values() {
            if conn.stage == Stage::New && conn.since.elapsed() > HELLO_TIMEOUT {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
        }
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
                        &CoordinatorMsg::CheckpointAndStop {
                            reason: reason.clone(),
                        },
                    );
                }
                self.stopping = Some(reason);
            }
        }
        if matches!(self.phase, Phase::Running) {
            let limit = self.watchdog.step_timeout.as_secs_f64();
            if self.watchdog.stalled(self.last_progress.elapsed()) {
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
            let waited = self.last_progress.elapsed();
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
            if self.watchdog.stalled(self.last_progress.elapsed()) {
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

    /// Sends a message; a worker that cannot take it is disconnected (its reader thread
    /// then reports the close, which is handled like any other loss).
    fn send(&mut self, id: ConnId, msg: &CoordinatorMsg) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        match write_frame(&mut conn.stream, msg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(peer = %conn.peer, "sending to a worker failed: {e:#}");
                let _ = conn.stream.shutdown(Shutdown::Both);
                false
            }
        }
    }

    fn refuse(&mut self, id: ConnId, reason: &str) {
        if let Some(conn) = self.conns.get(&id) {
            tracing::warn!(peer = %conn.peer, "refused a worker: {reason}");
        }
        self.send(
            id,
            &CoordinatorMsg::Refused {
                reason: reason.to_string(),
            },
        );
        if let Some(conn) = self.conns.get(&id) {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    fn stop_all(&mut self, reason: &str, rejoin: bool) {
        let ids: Vec<ConnId> = self.members.iter().map(|m| m.conn).collect();
        for id in ids {
            self.send(
                id,
                &CoordinatorMsg::Stop {
                    reason: reason.to_string(),
                    rejoin,
                },
            );
        }
    }

    fn close_all(&mut self) {
        for conn in self.conns.values() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    fn publish(&self) {
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
