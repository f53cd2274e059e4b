//! `bertrain worker`: one training process, read top to bottom.
//!
//! 1. Check the device, read the job token, bind the collective's listener.
//! 2. Join the coordinator: receive the job, build the model and open the dataset it names,
//!    and send their fingerprints (the coordinator refuses a worker that differs).
//! 3. Once the whole world has joined: connect the collective (the TCP ring, or NCCL on
//!    GPUs), take rank 0's parameters.
//! 4. Train: every step takes this rank's micro-batches from the prefetching loader, runs
//!    forward/backward, all-reduces the gradients and updates; reports go to the coordinator.
//! 5. Evaluate on the validation split every `eval.every_steps` and at the end; rank 0
//!    checkpoints every `checkpoint.every_steps`, at the end, and where the ranks agree to
//!    stop (the job was interrupted).
//! 6. A generation that ends because a peer or the coordinator was lost is joined again,
//!    keeping this rank's training state: the coordinator restarts the job from the newest
//!    state a survivor kept (no step is redone), or else from the newest checkpoint.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bertrain_coordinator::faults;
use bertrain_coordinator::job;
use bertrain_coordinator::protocol::StartFrom;
use bertrain_coordinator::{Fingerprint, JoinInfo, StepMetrics, Welcome, WorkerClient};
use bertrain_model::TrainingBackend;
use bertrain_model::{BertForPreTraining, ParamLayout, load_flat_params};

use crate::checkpoint::Saver;
use crate::collective::{self, Collective, RingListener, RingOptions};
use crate::device::{self, DeviceChoice, OnBackend};
use crate::eval::Evaluator;
use crate::loader::{BatchShape, Prefetcher, SampleSource, SampleTrace};
use crate::optim::Optimizer;
use crate::prepare::{Prepared, route_address};
use crate::schedule::LrSchedule;
use crate::survivor::{Held, Kept, RecentReports, starting_state};
use crate::throughput::{Meter, Peak};
use crate::trainer::{AllReduceFailed, StepStats, Trainer};

/// Exit status of a worker whose training was stuck when the coordinator stopped it.
const EXIT_STUCK: i32 = 75;
/// Steps the loader may run ahead of training.
const PREFETCH_STEPS: usize = 4;
/// Rank 0 prints its throughput and MFU every this many steps and at the end...
const THROUGHPUT_EVERY_STEPS: u64 = 100;
/// ...leaving out the first steps of each generation, which compile and autotune kernels.
const THROUGHPUT_SKIP_STEPS: u64 = 5;

/// `bertrain worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's `host:port`.
    #[arg(long, env = "BERTRAIN_COORDINATOR", value_name = "HOST:PORT")]
    pub coordinator: String,
    /// File holding the job's token (the coordinator's `run_dir/token` unless the job sets
    /// `cluster.token_file`).
    #[arg(long, env = "BERTRAIN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Address the other workers reach this one at for the gradient ring [default: this
    /// machine's address on the route to the coordinator].
    #[arg(long, env = "BERTRAIN_ADVERTISE", value_name = "HOST")]
    pub advertise: Option<String>,
    /// Compute backend; must agree with the job's `cluster.backend` [default: the job's].
    #[arg(long, value_enum)]
    pub backend: Option<job::Backend>,
    /// GPU index for `--backend cuda` [default: LOCAL_RANK, or 0].
    #[arg(long, env = "LOCAL_RANK", value_name = "N")]
    pub device: Option<usize>,
    /// Seconds to wait for the coordinator and for the rest of the workers to join.
    #[arg(long, default_value_t = 600.0, value_name = "SECONDS")]
    pub join_timeout_s: f64,
}

/// Entry point of `bertrain worker`.
pub fn run(args: WorkerArgs) -> Result<()> {
    // A GPU worker that cannot use its GPU says so before it takes a place in the job.
    if let Some(backend) = args.backend {
        device::check(backend, args.device.unwrap_or(0))?;
    }
    let Some(token_file) = &args.token_file else {
        bail!(
            "no job token: pass --token-file FILE (the coordinator's run_dir/token, or the job's cluster.token_file)"
        );
    };
    let token = bertrain_coordinator::read_token(token_file)?;
    let advertise = match &args.advertise {
        Some(host) => host.clone(),
        None => route_address(&args.coordinator)?,
    };
    let listener_addr = format!("{advertise}:0");
    let info = JoinInfo {
        host: bertrain_coordinator::hostname(),
        collective_addr: String::new(),
    };

    let join_timeout = Duration::from_secs_f64(args.join_timeout_s);
    // One generation per pass: a generation that ends because a peer or the coordinator
    // was lost is joined again, with what this process kept, until the job is over.
    let mut kept = Kept::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        match generation(
            &args,
            &token,
            &info,
            &listener_addr,
            join_timeout,
            &mut kept,
        ) {
            Ok(Outcome::Finished) => return Ok(()),
            Ok(Outcome::Stopped(reason)) => {
                tracing::warn!("stopped: {reason}");
                return Ok(());
            }
            Ok(Outcome::Regrouped) => {
                backoff = Duration::from_millis(200);
                tracing::info!("left the generation to regroup; joining again");
            }
            Err(failure) if failure.rejoin => {
                tracing::warn!(
                    "generation ended: {:#}; joining again in {backoff:?}",
                    failure.error
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(failure) => return Err(failure.error),
        }
    }
}

/// How a generation ended well: the job finished, it was interrupted and this rank
/// stopped after the agreed checkpoint, or the ranks left it at an agreed step to regroup
/// (keeping their state: see `Held`).
pub enum Outcome {
    Finished,
    Stopped(String),
    Regrouped,
}

/// Why the ranks agreed to leave the generation (see `Trainer::step`'s `stop_vote`).
enum Leave {
    /// Checkpoint the agreed step and stop: the job was interrupted.
    CheckpointAndStop(String),
    /// Join again with the state of the agreed step: workers are waiting to join.
    Regroup,
}

impl Leave {
    /// What the coordinator asked for, once the ranks agreed to leave: each rank learns it
    /// from the coordinator's own message to it, which may arrive after the vote of another
    /// rank did, so it is waited for (up to `grace`). A checkpoint wins over a regroup.
    fn agreed(client: &WorkerClient, step: u64, grace: Duration) -> Result<Leave> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(reason) = client.checkpoint_requested() {
                return Ok(Leave::CheckpointAndStop(reason));
            }
            if client.regroup_requested().is_some() {
                return Ok(Leave::Regroup);
            }
            if let Some(stop) = client.stop_requested() {
                bail!("stopping after step {step}: {}", stop.reason);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the ranks agreed to leave after step {step}, but the coordinator's request did not come within {grace:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How a generation ended badly, and whether the job goes on without this process ending.
struct Failure {
    error: anyhow::Error,
    rejoin: bool,
}

/// Joins the job once and trains until the generation ends.
fn generation(
    args: &WorkerArgs,
    token: &str,
    info: &JoinInfo,
    listener_addr: &str,
    join_timeout: Duration,
    kept: &mut Kept,
) -> std::result::Result<Outcome, Failure> {
    let fatal = |error: anyhow::Error| Failure {
        error,
        rejoin: false,
    };
    // A fresh listener per generation: the previous ring's sockets are gone with it.
    let listener = RingListener::bind(listener_addr).map_err(fatal)?;
    let info = JoinInfo {
        host: info.host.clone(),
        collective_addr: listener.local_addr().map_err(fatal)?.to_string(),
    };
    let joined = WorkerClient::join(&args.coordinator, token, info, join_timeout, |job| {
        let backend = args.backend.unwrap_or(job.cluster.backend);
        if backend != job.cluster.backend {
            bail!(
                "this worker was started with --backend {backend:?} but the job's cluster.backend is {:?}",
                job.cluster.backend
            );
        }
        if kept.prepared.as_ref().is_none_or(|p| p.job != *job) {
            kept.prepared = Some(Prepared::new(job)?);
        }
        if kept.held.as_ref().is_some_and(|h| !h.continues(job)) {
            tracing::warn!(
                "the job changed; dropping the training state kept from the last generation"
            );
            kept.held = None;
        }
        let prepared = kept.prepared.as_ref().expect("prepared above");
        Ok(Fingerprint {
            held_step: kept.held.as_ref().map(|h| h.step),
            ..prepared.fingerprint()
        })
    });
    let (client, welcome) = joined.map_err(fatal)?;
    let prepared = kept
        .prepared
        .as_ref()
        .context("the coordinator welcomed this worker without offering a job")
        .map_err(fatal)?;
    tracing::info!(
        rank = welcome.rank,
        world_size = welcome.world_size,
        generation = welcome.generation,
        start_step = welcome.start_step,
        "joined"
    );
    let choice = DeviceChoice::from_job(&welcome.job, args.device.unwrap_or(0));
    let outcome = device::with_backend(
        choice,
        TrainRun {
            client: &client,
            welcome: &welcome,
            listener,
            gpu: choice.index,
            peak: device::peak(choice, welcome.job.cluster.device_peak_tflops),
            prepared,
            held: &mut kept.held,
        },
    );
    match outcome {
        Ok(Outcome::Regrouped) => {
            let step = kept.held.as_ref().map_or(0, |h| h.step);
            if let Err(e) = client.regrouped(step) {
                tracing::warn!("{e:#}");
            }
            Ok(Outcome::Regrouped)
        }
        Ok(outcome) => {
            kept.held = None;
            client.done().map_err(fatal)?;
            Ok(outcome)
        }
        Err(error) => {
            // Tell the coordinator (it restarts the generation), then wait briefly for its
            // verdict: rejoin, or the job is over.
            let _ = client.report_failure(&format!("{error:#}"));
            let stop = client.wait_for_stop(Duration::from_secs(10));
            let rejoin = stop.as_ref().is_none_or(|s| s.rejoin);
            Err(Failure { error, rejoin })
        }
    }
}

/// Everything a generation needs, handed to the backend chosen at run time.
pub struct TrainRun<'a> {
    client: &'a WorkerClient,
    welcome: &'a Welcome,
    listener: RingListener,
    /// The GPU index, for NCCL.
    gpu: usize,
    /// What MFU is relative to.
    peak: Option<Peak>,
    prepared: &'a Prepared,
    /// The state this rank kept from the last generation, if any; where it keeps its state
    /// if this generation ends badly.
    held: &'a mut Option<Held>,
}

impl OnBackend for TrainRun<'_> {
    type Output = Outcome;

    /// One generation on backend `B`: connect the collective, then [`train`], with a
    /// watcher beside it that aborts the collective when the coordinator ends the
    /// generation.
    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<Outcome> {
        let job = &self.welcome.job;
        let (rank, world) = (self.welcome.rank, self.welcome.world_size);
        let timeout = Duration::from_secs_f64(job.cluster.step_timeout_s);
        let mut collective: Box<dyn Collective> = match job.cluster.backend {
            job::Backend::Cpu => {
                let options = RingOptions {
                    session: self.welcome.generation,
                    io_timeout: timeout,
                    ..RingOptions::default()
                };
                Box::new(self.listener.connect(rank, &self.welcome.peers, &options)?)
            }
            job::Backend::Cuda => {
                drop(self.listener);
                collective::connect_nccl(self.client, rank, world, self.gpu, timeout)?
            }
        };
        let collective = collective.as_mut();
        let abort = collective.abort_handle();
        let finished = AtomicBool::new(false);
        let generation = Generation {
            client: self.client,
            welcome: self.welcome,
            prepared: self.prepared,
            peak: self.peak,
            grace: Duration::from_secs_f64(job.cluster.heartbeat_timeout_s),
        };
        std::thread::scope(|scope| {
            scope.spawn(|| watch_for_stop(self.client, abort, &finished, generation.grace));
            let outcome = train::<B>(&generation, collective, self.held, device);
            finished.store(true, Ordering::SeqCst);
            outcome
        })
    }
}

/// What a generation's training reads.
struct Generation<'a> {
    client: &'a WorkerClient,
    welcome: &'a Welcome,
    prepared: &'a Prepared,
    peak: Option<Peak>,
    /// How long a rank waits for the coordinator's word (`cluster.heartbeat_timeout_s`).
    grace: Duration,
}

/// Steps 3 to 5 of the module doc on backend `B`: the starting state, then the training
/// loop ([`steps`]). When the loop ends badly or to regroup, the state of the last
/// completed step stays with this process, in `held`, for the next generation.
fn train<B: TrainingBackend>(
    g: &Generation,
    collective: &mut dyn Collective,
    held: &mut Option<Held>,
    device: B::Device,
) -> Result<Outcome> {
    let (welcome, prepared, job) = (g.welcome, g.prepared, &g.welcome.job);
    let model = BertForPreTraining::<B>::new(&prepared.config, &device);
    let layout = ParamLayout::of(&model);
    let resend: Vec<StepMetrics> = match (&welcome.start, held.as_ref()) {
        (StartFrom::Peer { .. }, Some(h)) => h.reports.clone(),
        _ => Vec::new(),
    };
    let (params, optimizer_state) = starting_state(prepared, welcome, &layout, collective, held)?;
    for report in resend.iter().filter(|r| r.step <= welcome.start_step) {
        g.client.report_step(report)?;
    }
    let model = load_flat_params(model, &params, &layout);
    let t = &job.train;
    let mut trainer = Trainer::from_job(model, t, device);
    trainer.state = optimizer_state;
    trainer.padded = std::env::var(crate::PADDED_FORWARD_ENV).is_ok_and(|v| v == "padded");
    // On a GPU the optimizer runs where the gradients are. On the CPU the host path is
    // the device path, and the TCP ring wants host buffers anyway.
    if job.cluster.backend == job::Backend::Cuda {
        match t.optimizer {
            Optimizer::Adamw => trainer.keep_on_device()?,
            Optimizer::Lamb => tracing::warn!(
                "train.optimizer = \"lamb\" runs on the CPU (only AdamW runs on the GPU); expect slow steps"
            ),
        }
    }
    let mut reports = RecentReports::default();
    let outcome = steps(g, &mut trainer, collective, &mut reports);
    match &outcome {
        Err(_) => *held = Held::of(trainer, job, reports, false),
        Ok(Outcome::Regrouped) => *held = Held::of(trainer, job, reports, true),
        Ok(_) => {}
    }
    outcome
}

/// The training loop, from the welcome's start step to the end of the job or until the
/// ranks agree to leave. Each step's report is also kept in `reports` (see `Held`).
fn steps<B: TrainingBackend>(
    g: &Generation,
    trainer: &mut Trainer<B>,
    collective: &mut dyn Collective,
    reports: &mut RecentReports,
) -> Result<Outcome> {
    let (client, welcome, prepared, job) = (g.client, g.welcome, g.prepared, &g.welcome.job);
    let (rank, world) = (welcome.rank, welcome.world_size);
    let t = &job.train;
    let schedule = LrSchedule::from_job(t);
    let shape = BatchShape::from_job(t, rank, world);
    let source = SampleSource::for_training(prepared.train.clone(), job, &prepared.config)?;
    let loader = Prefetcher::start(source, shape, welcome.start_step, PREFETCH_STEPS);
    let mut evaluator = prepared
        .validation
        .as_ref()
        .map(|m| Evaluator::from_job(m.clone(), job, &prepared.config, rank, world))
        .transpose()?;
    let mut saver = (rank == 0)
        .then(|| Saver::from_job(job, prepared, world))
        .transpose()?;
    let sample_trace = SampleTrace::from_env(rank, welcome.generation)?;
    let mut meter = Meter::new(THROUGHPUT_SKIP_STEPS);

    for step in welcome.start_step..t.max_steps {
        if let Some(stop) = client.stop_requested() {
            bail!("stopping at step {step}: {}", stop.reason);
        }
        faults::at_step(step);
        if faults::due(faults::HANG_IN_STEP, step) {
            loop {
                std::thread::park();
            }
        }
        let stop_vote =
            client.checkpoint_requested().is_some() || client.regroup_requested().is_some();
        let started = Instant::now();
        let data = loader.next()?;
        let data_wait_s = started.elapsed().as_secs_f64();
        let lr = schedule.at(step);
        if let Some(trace) = &sample_trace {
            trace.record(step, &data.samples)?;
        }
        let stats = trainer
            .step(
                step,
                rank,
                &data.micro_batches,
                lr as f32,
                stop_vote,
                collective,
            )
            .inspect_err(|e| {
                // A step done again reports these losses (see `Held`).
                if let Some(f) = e.downcast_ref::<AllReduceFailed>() {
                    let elapsed = started.elapsed().as_secs_f64();
                    reports.push(step_metrics(
                        step + 1,
                        lr,
                        &f.stats,
                        elapsed,
                        data_wait_s,
                        world,
                    ));
                }
            })?;
        let step_time = started.elapsed();
        let step_time_s = step_time.as_secs_f64();
        let flops = data
            .micro_batches
            .iter()
            .map(|b| b.training_flops(&prepared.config))
            .sum();
        meter.record(step + 1, stats.tokens, flops, step_time);
        let report = step_metrics(step + 1, lr, &stats, step_time_s, data_wait_s, world);
        // Kept before it is sent: a report the coordinator never got is sent again.
        reports.push(report.clone());
        client.report_step(&report)?;

        let done = step + 1;
        let last = done == t.max_steps;
        if rank == 0
            && (done % THROUGHPUT_EVERY_STEPS == 0 || last)
            && let Some(line) = meter.report(done, g.peak.as_ref())
        {
            tracing::info!("throughput of rank 0, {line}");
        }
        if let Some(evaluator) = evaluator.as_mut()
            && (evaluator.due(done) || last)
        {
            client.report_eval(&evaluator.run(trainer, done)?)?;
        }
        let leave = stats
            .stop_agreed
            .then(|| Leave::agreed(client, done, g.grace))
            .transpose()?;
        let checkpoint_and_stop = matches!(leave, Some(Leave::CheckpointAndStop(_)));
        if let Some(saver) = saver.as_mut() {
            saver.report_finished(client)?;
            if saver.due(done) || last || checkpoint_and_stop {
                trainer.sync_host();
                saver.start(client, trainer, done, lr)?;
            }
        }
        if let Some(leave) = leave {
            if let Some(saver) = saver.as_mut() {
                saver.wait(client)?;
            }
            return Ok(match leave {
                Leave::CheckpointAndStop(reason) => {
                    Outcome::Stopped(format!("{reason}; checkpointed step {done}"))
                }
                Leave::Regroup => Outcome::Regrouped,
            });
        }
    }
    if let Some(saver) = saver.as_mut() {
        saver.wait(client)?;
    }
    Ok(Outcome::Finished)
}

/// Runs beside training until it `finished`: when the coordinator ends the generation,
/// aborts the collective, so a rank waiting in an all-reduce for a peer that went silent
/// leaves at once with the state of its last completed step. A training thread that does
/// not come back within `grace` (`cluster.heartbeat_timeout_s`: how long a worker may be
/// unresponsive) after that is stuck, in a kernel or a driver call: the process exits, so
/// that its supervisor (`launch`, the cluster's) starts it again.
fn watch_for_stop(
    client: &WorkerClient,
    abort: Option<collective::AbortHandle>,
    finished: &AtomicBool,
    grace: Duration,
) {
    let poll = Duration::from_millis(50);
    let stop = loop {
        if finished.load(Ordering::SeqCst) {
            return;
        }
        if let Some(stop) = client.stop_requested().filter(|s| s.ends_generation) {
            break stop;
        }
        std::thread::sleep(poll);
    };
    if let Some(abort) = &abort {
        abort.abort();
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if finished.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(poll);
    }
    tracing::error!(
        "told to stop ({}), but training did not come back within {grace:?} (cluster.heartbeat_timeout_s); exiting so that this worker is started again",
        stop.reason
    );
    std::process::exit(EXIT_STUCK);
}

fn step_metrics(
    step: u64,
    lr: f64,
    s: &StepStats,
    step_time_s: f64,
    data_wait_s: f64,
    world: usize,
) -> StepMetrics {
    StepMetrics {
        step,
        loss: s.loss,
        mlm_loss: s.mlm_loss,
        nsp_loss: s.nsp_loss,
        mlm_accuracy: s.mlm_accuracy,
        nsp_accuracy: s.nsp_accuracy,
        lr,
        tokens_per_s: s.tokens as f64 / step_time_s.max(1e-9),
        step_time_s,
        data_wait_s,
        comm_s: s.comm_s,
        padding_fraction: s.padding_fraction,
        world,
    }
}
