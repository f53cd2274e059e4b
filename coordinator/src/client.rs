//! The worker's side of the protocol: join, heartbeats, reports, bootstrap, stop.

use std::io::BufReader;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::job::JobConfig;
use crate::protocol::{
    CoordinatorMsg, EvalMetrics, JoinRequest, MAX_REASON_BYTES, PROTOCOL_VERSION, ReadError,
    StepMetrics, Welcome, WorkerMsg, read_frame, write_frame,
};

const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a worker tells the coordinator about where it runs.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    /// Host name for logs and the status page (see [`hostname`]).
    pub host: String,
    /// `host:port` where this worker accepts its ring predecessor (the collective's listener).
    pub collective_addr: String,
}

/// What the worker built (or kept) for the job; the coordinator refuses a worker whose
/// data or model differs from the others'.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    pub model_hash: String,
    /// `Manifest::content_hash()` of the job's training manifest as this worker reads it.
    pub dataset_hash: String,
    /// Steps completed by the training state this worker kept from an earlier generation
    /// of this job, if any (see `protocol::JoinRequest::held_step`).
    pub held_step: Option<u64>,
}

/// Why this worker must leave its generation.
#[derive(Debug, Clone, PartialEq)]
pub struct StopRequest {
    pub reason: String,
    /// The job goes on: join again (the coordinator restarts the generation, or it was
    /// lost and will be back).
    pub rejoin: bool,
    /// The coordinator ended the generation (a rank is lost): collective operations in
    /// progress are abandoned. Not when the connection to the coordinator broke: the ranks
    /// then finish the step in progress together and stop at the next one, so that they
    /// all keep the same step (an abandoned all-reduce can complete on some ranks only).
    pub ends_generation: bool,
}

/// A worker's live connection to the coordinator. Heartbeats run on a background thread
/// from join until [`done`](Self::done), [`report_failure`](Self::report_failure) or drop.
pub struct WorkerClient {
    writer: Arc<Mutex<TcpStream>>,
    rank: usize,
    stop: Arc<Mutex<Option<StopRequest>>>,
    checkpoint_request: Arc<Mutex<Option<String>>>,
    regroup_request: Arc<Mutex<Option<String>>>,
    /// Behind a mutex so that the client can be shared with a watching thread.
    bootstrap: Mutex<Receiver<Vec<u8>>>,
    finished: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

impl WorkerClient {
    /// Connects to the coordinator at `addr` (retrying with backoff while it is not up
    /// yet), proves the token, receives the job, calls `fingerprint` on it, joins, and
    /// waits until the whole world has joined. Every wait is bounded by `timeout`.
    pub fn join(
        addr: &str,
        token: &str,
        info: JoinInfo,
        timeout: Duration,
        fingerprint: impl FnOnce(&JobConfig) -> Result<Fingerprint>,
    ) -> Result<(WorkerClient, Welcome)> {
        let deadline = Instant::now() + timeout;
        let stream = connect_with_retry(addr, deadline)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let writer = Arc::new(Mutex::new(stream));
        send(
            &writer,
            &WorkerMsg::Hello {
                token: token.to_string(),
                protocol_version: PROTOCOL_VERSION,
            },
        )?;

        let job = match receive(&mut reader, addr, deadline)? {
            CoordinatorMsg::JobOffer { job } => job,
            other => bail!(
                "coordinator {addr} answered the hello with {}",
                name_of(&other)
            ),
        };
        let fp = fingerprint(&job)?;

        // Heartbeats start before the join: waiting for the rest of the world can take
        // longer than the coordinator's silence limit.
        let stop = Arc::new(Mutex::new(None));
        let finished = Arc::new(AtomicBool::new(false));
        let interval = crate::watchdog::Watchdog::from_job(&job.cluster).heartbeat;
        let heartbeat = spawn_heartbeat(writer.clone(), interval, stop.clone(), finished.clone());
        let mut client = WorkerClient {
            writer,
            rank: 0,
            stop: stop.clone(),
            checkpoint_request: Arc::new(Mutex::new(None)),
            regroup_request: Arc::new(Mutex::new(None)),
            bootstrap: Mutex::new(mpsc::channel().1),
            finished,
            heartbeat: Some(heartbeat),
        };
        client.send(&WorkerMsg::Join(JoinRequest {
            host: info.host,
            collective_addr: info.collective_addr,
            model_hash: fp.model_hash,
            dataset_hash: fp.dataset_hash,
            held_step: fp.held_step,
        }))?;
        let welcome = match receive(&mut reader, addr, deadline)? {
            CoordinatorMsg::Welcome(w) => *w,
            other => bail!(
                "coordinator {addr} answered the join with {}",
                name_of(&other)
            ),
        };
        reader.get_ref().set_read_timeout(None)?;
        let (bootstrap_tx, bootstrap_rx) = mpsc::channel();
        client.rank = welcome.rank;
        client.bootstrap = Mutex::new(bootstrap_rx);
        let finished = client.finished.clone();
        let requests = Requests {
            stop,
            checkpoint: client.checkpoint_request.clone(),
            regroup: client.regroup_request.clone(),
        };
        thread::spawn(move || listen(reader, bootstrap_tx, requests, finished));
        Ok((client, welcome))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn report_step(&self, metrics: &StepMetrics) -> Result<()> {
        self.send(&WorkerMsg::StepReport(metrics.clone()))
    }

    pub fn report_eval(&self, metrics: &EvalMetrics) -> Result<()> {
        self.send(&WorkerMsg::EvalReport(metrics.clone()))
    }

    /// Rank 0's report of a checkpoint write: the sealed directory, or why it failed.
    pub fn report_checkpoint(
        &self,
        step: u64,
        result: &Result<PathBuf>,
        seconds: f64,
    ) -> Result<()> {
        self.send(&match result {
            Ok(dir) => WorkerMsg::Checkpointed {
                step,
                dir: dir.clone(),
                seconds,
            },
            Err(e) => WorkerMsg::CheckpointFailed {
                step,
                reason: cut(&format!("{e:#}")),
            },
        })
    }

    /// Shares collective bootstrap bytes (an NCCL unique id, say): rank 0 passes
    /// `Some(bytes)`, the others `None`, and every rank gets rank 0's bytes back.
    pub fn exchange_bootstrap(&self, blob: Option<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>> {
        if let Some(blob) = blob {
            if self.rank != 0 {
                bail!(
                    "only rank 0 publishes collective bootstrap data (this is rank {})",
                    self.rank
                );
            }
            self.send(&WorkerMsg::Bootstrap { blob })?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(stop) = self.stop_requested() {
                bail!(
                    "stopped while waiting for the collective bootstrap: {}",
                    stop.reason
                );
            }
            let received = self
                .bootstrap
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv_timeout(Duration::from_millis(100));
            match received {
                Ok(blob) => return Ok(blob),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no collective bootstrap data from rank 0 within {:.0} s",
                        timeout.as_secs_f64()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => bail!("connection to the coordinator lost"),
            }
        }
    }

    /// Why the coordinator wants this worker to stop (or why the connection to it broke),
    /// if it does. The trainer checks this once per step.
    pub fn stop_requested(&self) -> Option<StopRequest> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the coordinator asked for a checkpoint followed by a stop, if it did.
    pub fn checkpoint_requested(&self) -> Option<String> {
        self.checkpoint_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the coordinator asked the ranks to leave the generation at an agreed step and
    /// join again, if it did.
    pub fn regroup_requested(&self) -> Option<String> {
        self.regroup_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells the coordinator this rank finished its work, and disconnects.
    pub fn done(mut self) -> Result<()> {
        self.end(WorkerMsg::Done)
    }

    /// Tells the coordinator this rank left the generation after `step` steps to regroup,
    /// and disconnects.
    pub fn regrouped(mut self, step: u64) -> Result<()> {
        self.end(WorkerMsg::Regrouped { step })
    }

    /// Tells the coordinator this rank's generation failed and why, staying connected to
    /// hear what happens next (see [`wait_for_stop`](Self::wait_for_stop)).
    pub fn report_failure(&self, reason: &str) -> Result<()> {
        self.send(&WorkerMsg::Failed {
            reason: cut(reason),
        })
    }

    /// Waits up to `timeout` for the coordinator's stop (or for the connection to end).
    pub fn wait_for_stop(&self, timeout: Duration) -> Option<StopRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(stop) = self.stop_requested() {
                return Some(stop);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn end(&mut self, last: WorkerMsg) -> Result<()> {
        self.stop_heartbeat();
        let sent = self.send(&last);
        if let Ok(stream) = self.writer.lock() {
            let _ = stream.shutdown(Shutdown::Write);
        }
        sent
    }

    fn stop_heartbeat(&mut self) {
        self.finished.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }

    fn send(&self, msg: &WorkerMsg) -> Result<()> {
        send(&self.writer, msg)
    }
}

impl Drop for WorkerClient {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if let Ok(stream) = self.writer.lock() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn send(writer: &Mutex<TcpStream>, msg: &WorkerMsg) -> Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|e| e.into_inner());
    write_frame(&mut *stream, msg).context("sending to the coordinator")
}

fn connect_with_retry(addr: &str, deadline: Instant) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = addr
            .to_socket_addrs()
            .map_err(anyhow::Error::from)
            .and_then(|mut addrs| addrs.next().context("the address resolves to nothing"))
            .and_then(|sock| {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10));
                Ok(TcpStream::connect_timeout(
                    &sock,
                    left.min(Duration::from_secs(5)),
                )?)
            });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() + backoff >= deadline => {
                return Err(e.context(format!(
                    "connecting to the coordinator at {addr} (gave up retrying)"
                )));
            }
            Err(e) => {
                tracing::debug!(
                    "coordinator {addr} not reachable yet ({e:#}); retrying in {backoff:?}"
                );
                thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Reads the coordinator's next message before `deadline`; a refusal becomes an error
/// carrying the coordinator's reason.
fn receive(
    reader: &mut BufReader<TcpStream>,
    addr: &str,
    deadline: Instant,
) -> Result<CoordinatorMsg> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out waiting for the coordinator at {addr}");
    }
    reader.get_ref().set_read_timeout(Some(left))?;
    match read_frame::<CoordinatorMsg>(reader) {
        Ok(Some(CoordinatorMsg::Refused { reason })) => {
            bail!("coordinator {addr} refused this worker: {reason}")
        }
        Ok(Some(CoordinatorMsg::Stop { reason, .. })) => {
            bail!("coordinator {addr} stopped the job: {reason}")
        }
        Ok(Some(msg)) => Ok(msg),
        Ok(None) => bail!("coordinator {addr} closed the connection"),
        Err(ReadError::TimedOut) => {
            bail!("timed out waiting for the coordinator at {addr} (other workers missing?)")
        }
        Err(e) => bail!("reading from the coordinator at {addr}: {e}"),
    }
}

fn spawn_heartbeat(
    writer: Arc<Mutex<TcpStream>>,
    interval: Duration,
    stop: Arc<Mutex<Option<StopRequest>>>,
    finished: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let slice = Duration::from_millis(50).min(interval);
        let mut next = Instant::now();
        while !finished.load(Ordering::SeqCst) {
            if Instant::now() >= next {
                if let Err(e) = send(&writer, &WorkerMsg::Heartbeat) {
                    set_stop(
                        &stop,
                        format!("heartbeat to the coordinator failed: {e:#}"),
                        true,
                        false,
                    );
                    return;
                }
                next += interval;
            }
            thread::sleep(slice);
        }
    })
}

/// What the coordinator asked of a worker, as the background reader records it.
struct Requests {
    stop: Arc<Mutex<Option<StopRequest>>>,
    checkpoint: Arc<Mutex<Option<String>>>,
    regroup: Arc<Mutex<Option<String>>>,
}

/// Background reader after the welcome: relays bootstrap data, records requests.
fn listen(
    mut reader: BufReader<TcpStream>,
    bootstrap: Sender<Vec<u8>>,
    requests: Requests,
    finished: Arc<AtomicBool>,
) {
    let stop = &requests.stop;
    loop {
        match read_frame::<CoordinatorMsg>(&mut reader) {
            Ok(Some(CoordinatorMsg::Bootstrap { blob })) => {
                let _ = bootstrap.send(blob);
            }
            Ok(Some(CoordinatorMsg::Stop { reason, rejoin })) => {
                set_stop(stop, reason, rejoin, true)
            }
            Ok(Some(CoordinatorMsg::CheckpointAndStop { reason })) => {
                let mut slot = requests
                    .checkpoint
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(reason);
            }
            Ok(Some(CoordinatorMsg::Regroup { reason })) => {
                let mut slot = requests.regroup.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(reason);
            }
            Ok(Some(other)) => tracing::warn!(
                "ignoring an unexpected {} from the coordinator",
                name_of(&other)
            ),
            Ok(None) => {
                if !finished.load(Ordering::SeqCst) {
                    set_stop(
                        stop,
                        "the coordinator closed the connection".into(),
                        true,
                        false,
                    );
                }
                return;
            }
            Err(e) => {
                if !finished.load(Ordering::SeqCst) {
                    set_stop(
                        stop,
                        format!("connection to the coordinator broke: {e:#}"),
                        true,
                        false,
                    );
                }
                return;
            }
        }
    }
}

fn set_stop(
    stop: &Mutex<Option<StopRequest>>,
    reason: String,
    rejoin: bool,
    ends_generation: bool,
) {
    let mut slot = stop.lock().unwrap_or_else(|e| e.into_inner());
    // The first reason is the cause; later ones are usually its consequences.
    slot.get_or_insert(StopRequest {
        reason,
        rejoin,
        ends_generation,
    });
}

/// `reason`, cut to what a worker frame may carry.
fn cut(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

fn name_of(msg: &CoordinatorMsg) -> &'static str {
    match msg {
        CoordinatorMsg::JobOffer { .. } => "a job offer",
        CoordinatorMsg::Welcome(_) => "a welcome",
        CoordinatorMsg::Refused { .. } => "a refusal",
        CoordinatorMsg::Bootstrap { .. } => "bootstrap data",
        CoordinatorMsg::Stop { .. } => "a stop",
        CoordinatorMsg::CheckpointAndStop { .. } => "a checkpoint-and-stop",
        CoordinatorMsg::Regroup { .. } => "a regroup",
    }
}

/// This machine's host name (for [`JoinInfo::host`]).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}
