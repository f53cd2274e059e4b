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

use std::net::{ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bertrain_coordinator::checkpoints::{self, TrainerState};
use bertrain_coordinator::faults;
use bertrain_coordinator::job::{self, JobConfig};
use bertrain_coordinator::protocol::StartFrom;
use bertrain_coordinator::{
    EvalMetrics, Fingerprint, JoinInfo, StepMetrics, Welcome, WorkerClient,
};
use bertrain_dataprep::Manifest;
use bertrain_dataprep::hex;
use bertrain_model::{
    BertConfig, BertForPreTraining, ParamLayout, hf, init_bert, load_flat_params,
};
use burn::tensor::backend::AutodiffBackend;
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, PendingWrite, Snapshot};
use crate::collective::{self, Collective, RingListener, RingOptions};
use crate::device::{self, DeviceChoice};
use crate::loader::{BatchShape, Prefetcher, SampleSource};
use crate::optim::{Optimizer, OptimizerState};
use crate::schedule::LrSchedule;
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

/// What a worker keeps from one generation for the next: what it built for the job (so a
/// survivor does not verify the dataset again), and the training state it had when its
/// generation ended badly.
#[derive(Default)]
struct Kept {
    prepared: Option<Prepared>,
    held: Option<Held>,
}

/// A rank's training state after `step` steps of `job`, kept when a peer or the
/// coordinator was lost, and offered to the next generation (`StartFrom::Peer`).
struct Held {
    job: JobConfig,
    step: u64,
    params: Vec<f32>,
    optimizer: OptimizerState,
    /// This rank's reports of the last steps it computed, up to `step`, or `step + 1` if
    /// that step's all-reduce failed here while it completed on another rank. The
    /// coordinator may not have logged them (it was lost itself, or restarted), so the
    /// ones up to where the next generation starts are sent again; it keeps what it lacks.
    reports: Vec<StepMetrics>,
}

/// The reports a rank sent last (see `Held::reports`).
#[derive(Default)]
struct RecentReports(std::collections::VecDeque<StepMetrics>);

impl RecentReports {
    /// More steps than a worker runs between losing the coordinator and noticing.
    const KEPT: usize = 64;

    fn push(&mut self, report: StepMetrics) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(report);
    }
}

impl Held {
    /// Whether this state continues `job`: the same training, model and data settings (the
    /// cluster's may change between generations).
    fn continues(&self, job: &JobConfig) -> bool {
        self.job.train == job.train && self.job.model == job.model && self.job.data == job.data
    }

    /// The state of `trainer`. State on a GPU is kept only when the generation ended well
    /// (`device_intact`, a regroup): after a failed NCCL call the device's stream is in an
    /// unknown state, so the job goes back to its checkpoint.
    fn of<B: AutodiffBackend>(
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

/// The address of this machine's interface on the route to `coordinator`: what the
/// other workers can most likely reach. No packet is sent (UDP "connect" only routes).
fn route_address(coordinator: &str) -> Result<String> {
    let target = coordinator
        .to_socket_addrs()
        .with_context(|| format!("resolving the coordinator address {coordinator}"))?
        .next()
        .with_context(|| format!("the coordinator address {coordinator} resolves to nothing"))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).context("finding this machine's address")?;
    socket.connect(target).with_context(|| {
        format!("no route to the coordinator {coordinator}; pass --advertise HOST")
    })?;
    Ok(socket.local_addr()?.ip().to_string())
}

/// What the worker builds from the job before it joins: the model's shape and initial
/// weights, and the datasets.
pub struct Prepared {
    pub job: JobConfig,
    pub config: BertConfig,
    /// Initial parameters in `ParamLayout` order (rank 0's are broadcast to all ranks).
    pub initial: Vec<f32>,
    pub train: Manifest,
    pub validation: Option<Manifest>,
}

impl Prepared {
    pub fn new(job: &JobConfig) -> Result<Prepared> {
        let train = Manifest::load_verified(&job.data.manifest)?;
        let validation = job
            .data
            .validation_manifest
            .as_deref()
            .map(Manifest::load_verified)
            .transpose()?;
        let (config, initial) = initial_model(job, &train)?;
        Ok(Prepared {
            job: job.clone(),
            config,
            initial,
            train,
            validation,
        })
    }

    /// Hash of the settings a resumed run must share with the run it continues.
    fn job_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.config.to_hf_json().as_bytes());
        h.update(format!(
            "seed={};batch={}",
            self.job.train.seed, self.job.train.global_batch_size
        ));
        hex(&h.finalize())
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(self.config.to_hf_json().as_bytes());
        h.update(bytemuck::cast_slice::<f32, u8>(&self.initial));
        Fingerprint {
            model_hash: hex(&h.finalize()),
            dataset_hash: self.train.content_hash(),
            held_step: None,
        }
    }
}

/// The model the job names, with its initial parameters. A preset takes its vocabulary
/// size from the dataset; a config file or initial weights must agree with it.
fn initial_model(job: &JobConfig, data: &Manifest) -> Result<(BertConfig, Vec<f32>)> {
    let m = &job.model;
    let config = if let Some(preset) = &m.preset {
        let name = preset.strip_prefix("bert-").unwrap_or(preset);
        let mut config =
            BertConfig::preset(name).with_context(|| format!("model.preset = {preset:?}"))?;
        config.vocab_size = data.vocab_size;
        config
    } else if let Some(path) = &m.config {
        BertConfig::load(path)?
    } else if let Some(dir) = &m.init_from {
        BertConfig::load(&dir.join(hf::CONFIG_FILE))
            .with_context(|| format!("model.init_from = {}", dir.display()))?
    } else {
        bail!("[model] needs one of preset, config or init_from");
    };
    if config.vocab_size != data.vocab_size {
        bail!(
            "the model's vocab_size is {} but dataset {} was made with a vocabulary of {}; \
             use the vocabulary the model was trained with (or a preset, which adopts the dataset's)",
            config.vocab_size,
            data.dir().display(),
            data.vocab_size
        );
    }
    if config.max_position_embeddings < data.max_seq_len {
        bail!(
            "dataset {} holds rows of up to {} tokens (its max_seq_len), more than the model's \
             max_position_embeddings = {}; remake the dataset with --max-seq-len {} or use a model with more positions",
            data.dir().display(),
            data.max_seq_len,
            config.max_position_embeddings,
            config.max_position_embeddings
        );
    }
    let shape = BertForPreTraining::<burn::backend::Flex>::new(&config, &Default::default());
    let layout = ParamLayout::of(&shape);
    let flat = match &m.init_from {
        Some(dir) => {
            let loaded = hf::load_dir(dir, &layout, job.train.seed)?;
            if !loaded.initialised.is_empty() {
                tracing::warn!(
                    "{} has no pretraining heads; initialised {} of them: {}",
                    dir.display(),
                    loaded.initialised.len(),
                    loaded.initialised.join(", ")
                );
            }
            loaded.flat
        }
        None => bertrain_model::flatten_params(&init_bert::<burn::backend::Flex>(
            &config,
            job.train.seed,
            &Default::default(),
        )),
    };
    Ok((config, flat))
}

/// Everything [`train`] needs, handed to the backend chosen at run time.
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

impl TrainRun<'_> {
    /// The training loop on backend `B`.
    pub fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Outcome> {
        let TrainRun {
            client,
            welcome,
            listener,
            gpu,
            peak,
            prepared,
            held,
        } = self;
        let job = &welcome.job;
        let (rank, world) = (welcome.rank, welcome.world_size);
        let timeout = Duration::from_secs_f64(job.cluster.step_timeout_s);
        let mut collective: Box<dyn Collective> = match job.cluster.backend {
            job::Backend::Cpu => {
                let options = RingOptions {
                    session: welcome.generation,
                    io_timeout: timeout,
                    ..RingOptions::default()
                };
                Box::new(listener.connect(rank, &welcome.peers, &options)?)
            }
            job::Backend::Cuda => {
                drop(listener);
                collective::connect_nccl(client, rank, world, gpu, timeout)?
            }
        };
        let collective = collective.as_mut();
        // A stop from the coordinator ends the collective's wait for a peer that is gone.
        let abort = collective.abort_handle();
        let finished = AtomicBool::new(false);
        let grace = Duration::from_secs_f64(job.cluster.heartbeat_timeout_s);
        std::thread::scope(|scope| {
            scope.spawn(|| watch_for_stop(client, abort, &finished, grace));
            let outcome = (|| -> Result<Outcome> {
                let model = BertForPreTraining::<B>::new(&prepared.config, &device);
                let layout = ParamLayout::of(&model);
                let resend: Vec<StepMetrics> = match (&welcome.start, held.as_ref()) {
                    (StartFrom::Peer { .. }, Some(h)) => h.reports.clone(),
                    _ => Vec::new(),
                };
                let (params, optimizer_state) =
                    starting_state(prepared, welcome, &layout, collective, held)?;
                for report in resend.iter().filter(|r| r.step <= welcome.start_step) {
                    client.report_step(report)?;
                }
                let model = load_flat_params(model, &params, &layout);
                let t = &job.train;
                let mut trainer = Trainer::from_job(model, t, device);
                trainer.state = optimizer_state;
                trainer.padded =
                    std::env::var(crate::PADDED_FORWARD_ENV).is_ok_and(|v| v == "padded");
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
                let schedule = LrSchedule::from_job(t);
                let shape = BatchShape::from_job(t, rank, world);
                let source =
                    SampleSource::for_training(prepared.train.clone(), job, &prepared.config)?;
                let loader = Prefetcher::start(source, shape, welcome.start_step, PREFETCH_STEPS);
                let mut evaluator = prepared
                    .validation
                    .as_ref()
                    .map(|m| Evaluator::new(m.clone(), job, &prepared.config, rank, world))
                    .transpose()?;
                let mut saver = (rank == 0)
                    .then(|| Saver::new(job, prepared, world))
                    .transpose()?;
                let sample_trace = SampleTrace::from_env(rank, welcome.generation)?;
                let mut meter = Meter::new(THROUGHPUT_SKIP_STEPS);

                // Any error ends the generation; the state after the last completed step stays
                // with this process for the next one (see `Held`).
                let mut reports = RecentReports::default();
                let mut train = || -> Result<Outcome> {
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
                        let stop_vote = client.checkpoint_requested().is_some()
                            || client.regroup_requested().is_some();
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
                        let report = step_metrics(step + 1, lr, &stats, step_time_s, data_wait_s);
                        // Kept before it is sent: a report the coordinator never got is sent again.
                        reports.push(report.clone());
                        client.report_step(&report)?;

                        let done = step + 1;
                        let last = done == t.max_steps;
                        if rank == 0
                            && (done % THROUGHPUT_EVERY_STEPS == 0 || last)
                            && let Some(line) = meter.report(done, peak.as_ref())
                        {
                            tracing::info!("throughput of rank 0, {line}");
                        }
                        if let Some(evaluator) = evaluator.as_mut()
                            && (evaluator.due(done) || last)
                        {
                            client.report_eval(&evaluator.run(&trainer, done)?)?;
                        }
                        let leave = stats
                            .stop_agreed
                            .then(|| Leave::agreed(client, done, grace))
                            .transpose()?;
                        let checkpoint_and_stop =
                            matches!(leave, Some(Leave::CheckpointAndStop(_)));
                        if let Some(saver) = saver.as_mut() {
                            saver.report_finished(client)?;
                            if saver.due(done) || last || checkpoint_and_stop {
                                trainer.sync_host();
                                saver.start(client, &trainer, done, lr)?;
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
                };
                let outcome = train();
                match &outcome {
                    Err(_) => *held = Held::of(trainer, job, reports, false),
                    Ok(Outcome::Regrouped) => *held = Held::of(trainer, job, reports, true),
                    Ok(_) => {}
                }
                outcome
            })();
            finished.store(true, Ordering::SeqCst);
            outcome
        })
    }
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

/// Parameters and optimizer state the generation starts from, the same on every rank: the
/// source rank's (rank 0 for the initial model and checkpoints, the survivor the
/// coordinator chose for a kept state), broadcast to all ranks. A kept state is used up
/// only once the broadcast succeeded, so a survivor whose next generation fails at once
/// still holds it.
fn starting_state(
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

/// Rank 0's checkpointing: snapshots taken between steps, written in the background, one
/// at a time, each reported to the coordinator when done.
struct Saver {
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
    fn new(job: &JobConfig, prepared: &Prepared, world: usize) -> Result<Saver> {
        let checkpoints = checkpoints::checkpoints_dir(&job.job.run_dir);
        std::fs::create_dir_all(&checkpoints)
            .with_context(|| format!("cannot create {}", checkpoints.display()))?;
        checkpoint::remove_partial_writes(&checkpoints)?;
        let vocab = prepared.train.dir().join(&prepared.train.vocab_file);
        let casing = bertrain_dataprep::Vocab::load(&vocab, None)?.casing;
        Ok(Saver {
            every_steps: job.checkpoint.every_steps,
            checkpoints,
            config: prepared.config.clone(),
            tokenizer_config: casing.tokenizer_config_json(),
            vocab,
            base: TrainerState {
                format_version: checkpoints::TRAINER_FORMAT_VERSION,
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
    fn due(&self, done: u64) -> bool {
        every(self.every_steps, done)
    }

    /// Copies the state after `step` steps and starts writing it (after the previous write
    /// has finished: at most one write at a time).
    fn start<B: AutodiffBackend>(
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
    fn report_finished(&mut self, client: &WorkerClient) -> Result<()> {
        if self.pending.as_ref().is_some_and(PendingWrite::is_finished) {
            self.wait(client)?;
        }
        Ok(())
    }

    /// Waits for the write in progress, if any, and reports it.
    fn wait(&mut self, client: &WorkerClient) -> Result<()> {
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

fn step_metrics(
    step: u64,
    lr: f64,
    s: &StepStats,
    step_time_s: f64,
    data_wait_s: f64,
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
    }
}

/// This rank's share of the validation split: the same samples at every evaluation (the
/// first `per_rank` of the split's seeded order, offset by rank), so evaluations compare.
struct Evaluator {
    /// `eval.every_steps`.
    every_steps: u64,
    source: SampleSource,
    shape: BatchShape,
}

/// Whether a thing done every `every_steps` steps (0: never) is due after `done` steps.
fn every(every_steps: u64, done: u64) -> bool {
    every_steps > 0 && done.is_multiple_of(every_steps)
}

impl Evaluator {
    fn new(
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
    fn due(&self, done: u64) -> bool {
        every(self.every_steps, done)
    }

    fn run<B: AutodiffBackend>(&mut self, trainer: &Trainer<B>, step: u64) -> Result<EvalMetrics> {
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

/// With `BERTRAIN_TRACE_SAMPLES=DIR`, every rank appends `step shard row generation` for
/// each sample it trains on to `DIR/samples-<pid>.txt`: how the tests check that a resumed
/// or elastic epoch uses every sample exactly once (a step a lost generation began and the
/// next one did again counts once, in the later generation). Off (and free) otherwise.
struct SampleTrace {
    file: std::fs::File,
    generation: u64,
}

impl SampleTrace {
    fn from_env(rank: usize, generation: u64) -> Result<Option<SampleTrace>> {
        let Some(dir) = std::env::var_os("BERTRAIN_TRACE_SAMPLES") else {
            return Ok(None);
        };
        let path = Path::new(&dir).join(format!("samples-{}.txt", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("BERTRAIN_TRACE_SAMPLES: cannot open {}", path.display()))?;
        tracing::debug!(rank, path = %path.display(), "tracing samples");
        Ok(Some(SampleTrace { file, generation }))
    }

    fn record(&self, step: u64, samples: &[bertrain_coordinator::SampleRef]) -> Result<()> {
        use std::io::Write;
        let mut text = String::new();
        for s in samples {
            text += &format!("{step} {} {} {}\n", s.shard, s.row, self.generation);
        }
        (&self.file)
            .write_all(text.as_bytes())
            .context("BERTRAIN_TRACE_SAMPLES: write failed")
    }
}

#[cfg(test)]
#[path = "node/job_keys_test.rs"]
mod job_keys_test;
