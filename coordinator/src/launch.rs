//! `bertrain launch`: a whole job on one machine (like `torchrun --standalone`).
//!
//! Starts `bertrain coordinator` and N `bertrain worker` processes from this same
//! executable, prefixes their output (`[coord]`, `[w0]`, ...; a worker's rank is only
//! known after it joins, so workers are named by start order), forwards Ctrl-C/SIGTERM to
//! the coordinator (which has the workers checkpoint and stop), restarts a worker that
//! dies while the job goes on (it rejoins; the job continues from its latest checkpoint),
//! and makes sure no child outlives it: when the coordinator ends, the rest are stopped
//! (SIGTERM, then SIGKILL after a grace period) and reaped. Children run in their own
//! process group, so a terminal's Ctrl-C reaches only launch, which forwards it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::job::{Backend, Override};
use crate::server::load_job;
use crate::signals;
use crate::token::ensure_token;

/// How long children get to exit after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// `bertrain launch`.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// The job file (TOML).
    #[arg(long, value_name = "JOB.toml")]
    pub config: PathBuf,
    /// Worker processes to start [default: the job's cluster.world_size].
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
    /// Compute backend [default: the job's cluster.backend]. With `cuda`, worker i trains
    /// on GPU i (LOCAL_RANK=i): start at most as many workers as this machine has GPUs.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Override a job key, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<Override>,
    /// Continue from the newest committed checkpoint (same as `[job] resume = "auto"`).
    #[arg(long)]
    pub resume: bool,
}

struct Proc {
    name: String,
    /// Arguments to `bertrain` and extra environment, kept to start the process again.
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
    status: Option<ExitStatus>,
}

/// Entry point of `bertrain launch`. Succeeds when the coordinator (that is, the job) does.
pub fn run(args: LaunchArgs) -> Result<()> {
    signals::install()?;
    let mut overrides = args.overrides.clone();
    if let Some(n) = args.workers {
        overrides.push(format!("cluster.world_size={n}").parse()?);
    }
    if let Some(backend) = args.backend {
        let name = match backend {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        };
        overrides.push(format!("cluster.backend={name}").parse()?);
    }
    // Loading here validates the job (and the world size) before anything starts.
    let job = load_job(&args.config, &overrides, args.resume)?;
    let workers = job.cluster.world_size;
    ensure_token(&job)?;
    let token_file = job.token_path();
    let (port, http_port) = free_ports()?;
    let coordinator_addr = format!("127.0.0.1:{port}");
    overrides.push(format!("cluster.http=\"127.0.0.1:{http_port}\"").parse()?);

    let mut coordinator: Vec<String> = vec![
        "coordinator".into(),
        "--config".into(),
        args.config.display().to_string(),
        "--listen".into(),
        coordinator_addr.clone(),
    ];
    for o in &overrides {
        coordinator.extend(["--set".into(), o.source.clone()]);
    }
    if args.resume {
        coordinator.push("--resume".into());
    }
    tracing::info!(
        workers, coordinator = %coordinator_addr, status = %format!("http://127.0.0.1:{http_port}/"),
        "launching a coordinator and {workers} worker(s)"
    );
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let rayon_set = std::env::var_os("RAYON_NUM_THREADS").is_some();
    let mut procs = vec![start("coord", coordinator, Vec::new())?];
    for i in 0..workers {
        let worker = vec![
            "worker".into(),
            "--coordinator".into(),
            coordinator_addr.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        let env = worker_env(i, workers, job.cluster.backend, cores, rayon_set);
        match start(&format!("w{i}"), worker, env) {
            Ok(p) => procs.push(p),
            Err(e) => {
                stop_all(&mut procs, libc::SIGTERM);
                return Err(e);
            }
        }
    }
    supervise(&mut procs, job.cluster.max_restarts)
}

/// The environment of worker `i` of `workers`. Workers share this machine's cores instead of
/// each assuming it has them all (as torchrun sets OMP_NUM_THREADS), unless the user set
/// RAYON_NUM_THREADS; on GPUs, worker `i` takes GPU `i` (LOCAL_RANK, as torchrun sets it).
fn worker_env(
    i: u32,
    workers: u32,
    backend: Backend,
    cores: usize,
    rayon_set: bool,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if !rayon_set {
        let per_worker = (cores / workers as usize).max(1);
        env.push(("RAYON_NUM_THREADS".to_string(), per_worker.to_string()));
    }
    if backend == Backend::Cuda {
        env.push(("LOCAL_RANK".to_string(), i.to_string()));
    }
    env
}

/// Two distinct free loopback ports (coordinator, HTTP). Both listeners are held until
/// both are known, so the two cannot collide; another process could still take one
/// before the coordinator binds it, which the coordinator then reports.
fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn start(name: &str, args: Vec<String>, env: Vec<(String, String)>) -> Result<Proc> {
    let exe = std::env::current_exe().context("finding the bertrain executable")?;
    let mut command = Command::new(exe);
    command.args(&args).envs(env.iter().map(|(k, v)| (k, v)));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It asks the
    // kernel to SIGTERM the child if launch dies without reaping it (e.g. SIGKILL).
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {name}: {command:?}"))?;
    if let Some(out) = child.stdout.take() {
        relay(format!("[{name}] "), out, false);
    }
    if let Some(err) = child.stderr.take() {
        relay(format!("[{name}] "), err, true);
    }
    Ok(Proc {
        name: name.to_string(),
        args,
        env,
        child,
        status: None,
    })
}

/// Copies a child's output line by line with a prefix (bytes, not text: a child's output
/// need not be UTF-8).
fn relay(prefix: String, pipe: impl Read + Send + 'static, to_stderr: bool) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let mut out: Box<dyn Write> = if to_stderr {
                Box::new(std::io::stderr().lock())
            } else {
                Box::new(std::io::stdout().lock())
            };
            let _ = out
                .write_all(prefix.as_bytes())
                .and_then(|()| out.write_all(&line));
        }
    });
}

/// Waits for the job to end: signals go to the coordinator, a dead worker is started
/// again (at most `max_restarts` times per worker), and when the coordinator exits the
/// remaining workers are stopped.
fn supervise(procs: &mut [Proc], max_restarts: u32) -> Result<()> {
    let mut forwarded = 0;
    let mut restarts = vec![0u32; procs.len()];
    loop {
        let received = signals::count();
        if received > forwarded {
            forwarded = received;
            let signal = signals::received().unwrap_or(libc::SIGTERM);
            tracing::warn!(
                "received signal {signal}; asking the coordinator to checkpoint and stop the job"
            );
            if procs[0].status.is_none() {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(procs[0].child.id() as libc::pid_t, signal) };
            }
        }
        for i in 0..procs.len() {
            if procs[i].status.is_some() {
                continue;
            }
            let Some(status) = procs[i]
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", procs[i].name))?
            else {
                continue;
            };
            procs[i].status = Some(status);
            if i == 0 {
                // The coordinator ended the job: workers should be finishing or stopped.
                stop_all(procs, libc::SIGTERM);
                if status.success() {
                    return Ok(());
                }
                bail!("the job failed (coordinator {})", describe(status));
            }
            if !status.success() && forwarded == 0 {
                let name = procs[i].name.clone();
                if restarts[i] >= max_restarts {
                    tracing::error!(
                        "worker {name} {}; it was restarted {max_restarts} time(s) already",
                        describe(status)
                    );
                    continue;
                }
                restarts[i] += 1;
                tracing::warn!(
                    "worker {name} {}; starting it again (restart {} of {max_restarts})",
                    describe(status),
                    restarts[i]
                );
                let (args, env) = (procs[i].args.clone(), procs[i].env.clone());
                procs[i] = start(&name, args, env)?;
            }
        }
        thread::sleep(POLL);
    }
}

/// Lets children that are still running exit on their own for a moment, then sends them
/// `signal`, then SIGKILL after the grace period; reaps them all.
fn stop_all(procs: &mut [Proc], signal: i32) {
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle && reap(procs) {
        thread::sleep(POLL);
    }
    for p in procs.iter().filter(|p| p.status.is_none()) {
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the pid is ours.
        unsafe { libc::kill(p.child.id() as libc::pid_t, signal) };
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && reap(procs) {
        thread::sleep(POLL);
    }
    for p in procs.iter_mut().filter(|p| p.status.is_none()) {
        tracing::warn!("{} did not stop within {GRACE:?}; killing it", p.name);
        let _ = p.child.kill();
        p.status = p.child.wait().ok();
    }
}

/// Collects exited children; true while some are still running.
fn reap(procs: &mut [Proc]) -> bool {
    let mut running = false;
    for p in procs.iter_mut().filter(|p| p.status.is_none()) {
        match p.child.try_wait() {
            Ok(Some(status)) => p.status = Some(status),
            Ok(None) => running = true,
            Err(_) => p.status = p.child.wait().ok(),
        }
    }
    running
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_the_cores_and_each_gpu_worker_has_its_own_gpu() {
        let env = |i, backend, rayon_set| worker_env(i, 4, backend, 16, rayon_set);
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            env(2, Backend::Cpu, false),
            vec![pair("RAYON_NUM_THREADS", "4")]
        );
        assert_eq!(env(2, Backend::Cpu, true), vec![]);
        assert_eq!(
            env(3, Backend::Cuda, false),
            vec![pair("RAYON_NUM_THREADS", "4"), pair("LOCAL_RANK", "3")]
        );
        assert_eq!(
            worker_env(0, 3, Backend::Cpu, 2, false),
            vec![pair("RAYON_NUM_THREADS", "1")]
        );
    }
}
