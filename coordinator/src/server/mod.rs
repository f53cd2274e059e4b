//! `bertrain coordinator`: runs one job.
//!
//! Shape: an accept thread and one reader thread per connection (`network`) turn the
//! network into events on a single channel; one state loop (`network::serve`) hands them
//! to the state machine (`machine`), the only code that changes the job's state, and
//! performs what the machine queued in its outbox (messages to send, connections to
//! close), the only writes to workers. Nothing is shared but the channel and the status
//! board the HTTP server reads. This file sets the
//! job up: it loads the job file, checks the data, finds where a resumed run starts and
//! binds the sockets.
//!
//! States: `Rendezvous` (collecting `world_size` joins) -> `Running` (one generation of
//! workers training) -> end. A lost, failed or hung worker ends the generation: the
//! survivors are told to rejoin, keeping their training state, the state goes back to
//! `Rendezvous`, and the next generation starts from the newest state a survivor kept, or
//! else from the newest committed checkpoint, up to `cluster.max_restarts` times (see
//! `machine::generations`). SIGINT/SIGTERM asks the workers to checkpoint and stop; a
//! second signal stops at once. Everything that happens is written to the journal.

mod machine;
mod network;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bertrain_dataprep::Manifest;

use crate::checkpoints::{self, Found};
use crate::http;
use crate::job::{JobConfig, Override, Resume};
use crate::signals;
use crate::status::StatusBoard;
use crate::token::ensure_token;
use crate::watchdog::Watchdog;

use machine::{JobStart, Machine};
use network::{accept_loop, serve};

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
        let start = JobStart {
            job: self.job.clone(),
            token: self.token.clone(),
            dataset_hash: self.dataset_hash.clone(),
            total_rows: self.total_rows,
            start_step: self.start_step,
            resume_from: self.resume_from.clone(),
            interrupt: self.interrupt.clone(),
        };
        let outcome = Machine::new(start, metrics_path, board.clone()).and_then(|mut machine| {
            if machine.finished_already() {
                return Ok(());
            }
            machine.publish();
            serve(&mut machine, &inbox)
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
