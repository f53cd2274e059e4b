//! Helpers for the end-to-end tests: they run the real `bertrain` binary as separate
//! processes on loopback, always with a bounded wait, and always reap what they start.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn bertrain() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bertrain"));
    c.env("RUST_LOG", "info");
    c
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("bertrain-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped, whatever the test did.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a pipe to its end on a thread (so a chatty child never blocks on a full pipe).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `command` to completion within `limit`; past it, the child is killed and the test
/// fails with the child's output.
pub fn run_bounded(mut command: Command, limit: Duration) -> Output {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = command.spawn().expect("spawning bertrain");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut child = Reaped(child);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.0.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.unwrap_or_else(|| child.0.wait().unwrap());
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        Instant::now() < deadline,
        "{command:?} did not finish within {limit:?}\n{}",
        describe(&out)
    );
    out
}

/// `Output` as text, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: &Output) {
    assert!(out.status.success(), "{}", describe(out));
}

/// An empty directory `bertrain-e2e-{tag}-{pid}` for what a test binary makes once and
/// shares between its tests (a static, so never dropped). It lies under cargo's temp dir
/// for integration tests (inside `target/`), and the directories that earlier runs left
/// there, whose processes have ended, are removed first.
pub fn shared_dir(tag: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("bertrain-e2e-{tag}-");
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ended = name
            .strip_prefix(&prefix)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if ended {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small dataset of the synthetic corpus (corpus, vocab, shards with a validation split),
/// made once per test binary and shared read-only by its tests.
pub fn dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_dir("data");
        let corpus = dir.join("corpus.txt");
        let steps: [Vec<String>; 3] = [
            vec![
                "synth-corpus".into(),
                "--output".into(),
                path(&corpus),
                "--docs".into(),
                "300".into(),
            ],
            vec![
                "vocab".into(),
                "--input".into(),
                path(&corpus),
                "--vocab-size".into(),
                "2000".into(),
                "--output".into(),
                path(&dir.join("vocab.txt")),
            ],
            vec![
                "dataprep".into(),
                "--input".into(),
                path(&corpus),
                "--vocab".into(),
                path(&dir.join("vocab.txt")),
                "--output".into(),
                path(&dir.join("data")),
                "--dupe-factor".into(),
                "2".into(),
                "--validation-fraction".into(),
                "0.1".into(),
                "--max-seq-len".into(),
                "64".into(),
                "--max-predictions".into(),
                "10".into(),
                "--quiet".into(),
            ],
        ];
        for args in steps {
            let mut c = bertrain();
            c.args(&args);
            let out = run_bounded(c, Duration::from_secs(120));
            ok(&out);
        }
        dir
    })
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Reads an HF `model.safetensors` as (name, values) pairs.
pub fn read_weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Reads `metrics.jsonl` lines as JSON values.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The parameters of a run's newest checkpoint (what `checkpoints/latest` names).
pub fn final_weights(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    read_weights(
        &run_dir
            .join("checkpoints")
            .join(latest.trim())
            .join("model.safetensors"),
    )
}

/// A job file for a small model (hidden 32, 2 layers) on the shared test dataset: 16
/// sequences per step over 2 workers, 6 steps, evaluation every 3. Tests change it with
/// `--set`. With `dropout` 0, runs that cut the same global batch differently must agree.
pub fn write_job(dir: &Path, data: &Path, dropout: f64) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("data/manifest.json")).unwrap())
            .unwrap();
    let model = serde_json::json!({
        "vocab_size": manifest["vocab_size"], "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        "max_position_embeddings": 64, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12
    });
    std::fs::write(dir.join("model.json"), model.to_string()).unwrap();
    let job = format!(
        r#"
[job]
name = "e2e"
[model]
config = "model.json"
[data]
manifest = "{data}/data/manifest.json"
validation_manifest = "{data}/data/validation/manifest.json"
[train]
global_batch_size = 16
micro_batch_size = 8
max_steps = 6
lr = 1e-3
warmup_steps = 2
seed = 7
[checkpoint]
every_steps = 1000
keep_last = 3
[eval]
every_steps = 3
max_batches = 2
[cluster]
world_size = 2
heartbeat_timeout_s = 30
"#,
        data = data.display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, job).unwrap();
    path
}

/// Total training rows of the shared dataset.
pub fn dataset_rows(data: &Path) -> u64 {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("data/manifest.json")).unwrap())
            .unwrap();
    manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rows"].as_u64().unwrap())
        .sum()
}

/// A child started in the background whose output is collected; killed and reaped when
/// dropped.
pub struct Running {
    pub child: Reaped,
    output: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn start(mut command: Command) -> Running {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("spawning bertrain");
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        Running {
            child: Reaped(child),
            output,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped (Reaped waits only on drop).
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// Waits for the child to exit within `limit` (else fails the test with its output).
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {limit:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.0.try_wait().unwrap()
    }
}

/// Polls `condition` every 20 ms until it holds, failing the test after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Optimizer steps recorded in a run's `metrics.jsonl` so far.
pub fn steps_logged(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter(|l| l.ends_with('}') && !l.contains("\"split\""))
                .count()
        })
        .unwrap_or(0)
}

/// The step `checkpoints/latest` names, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run_dir.join("checkpoints/latest")).ok()?;
    text.trim().strip_prefix("step-")?.parse().ok()
}

/// `(step, loss)` of every training step in `metrics.jsonl`.
pub fn step_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    metrics(run_dir)
        .iter()
        .filter(|v| v.get("split").is_none())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Processes whose parent is `parent` and whose first argument (the subcommand) is `word`.
pub fn children_with(parent: u32, word: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start after ") ".
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let subcommand = cmdline.split(|&b| b == 0).nth(1).unwrap_or_default();
        if ppid == parent && subcommand == word.as_bytes() {
            out.push(pid);
        }
    }
    out
}

/// A free loopback port (the listener is closed again, so it could be taken meanwhile;
/// fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` worker processes joining the coordinator at `addr` with the job's token file.
pub fn start_workers(n: usize, addr: &str, token: &Path) -> Vec<Running> {
    (0..n)
        .map(|_| {
            let mut w = bertrain();
            w.arg("worker")
                .arg("--coordinator")
                .arg(addr)
                .arg("--token-file")
                .arg(token);
            Running::start(w)
        })
        .collect()
}

/// `bertrain coordinator` for `job` listening on `addr` (HTTP on `http`), writing to
/// `run_dir`, with further `--set` overrides.
pub fn coordinator_command(
    job: &Path,
    addr: &str,
    http: &str,
    run_dir: &Path,
    sets: &[String],
) -> Command {
    let mut c = bertrain();
    c.arg("coordinator")
        .arg("--config")
        .arg(job)
        .arg("--listen")
        .arg(addr);
    c.arg("--set")
        .arg(format!("job.run_dir={}", run_dir.display()));
    c.arg("--set").arg(format!("cluster.http={http}"));
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}
