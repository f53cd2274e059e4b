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

/// A small dataset of the synthetic corpus (corpus, vocab, shards with a validation split),
/// made once per test binary and shared read-only by its tests.
pub fn dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bertrain-e2e-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
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
