//! The job's progress as the outside world sees it: written by the coordinator's state
//! loop, read by the HTTP server (`/status` as JSON, `/metrics` in Prometheus format).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

/// Loss points kept for the status page's chart; beyond it every other point is dropped,
/// so a long run keeps its whole shape in bounded memory.
const MAX_HISTORY: usize = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Heard from within the heartbeat interval (with slack).
    Ok,
    /// Connected, but silent for longer than expected.
    Late,
    /// Said Done.
    Done,
    /// Connection lost.
    Lost,
}

#[derive(Debug, Clone)]
pub(crate) struct WorkerView {
    pub rank: Option<usize>,
    pub host: String,
    pub peer: String,
    pub last_heard: Instant,
    pub last_step: Option<u64>,
    pub gone: bool,
    pub done: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub job: String,
    /// `waiting`, `running`, `finished` or `failed`.
    pub state: &'static str,
    pub error: Option<String>,
    pub generation: u64,
    pub world_size: usize,
    pub step: Option<u64>,
    pub max_steps: u64,
    pub epoch: Option<u64>,
    pub loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub last_eval: Option<Value>,
    /// Step of the newest committed checkpoint.
    pub last_checkpoint: Option<u64>,
    /// Generations restarted after a lost worker.
    pub restarts: u32,
    pub workers: Vec<WorkerView>,
    pub loss_history: Vec<(u64, f64)>,
    pub started: Instant,
}

/// Shared between the state loop (writer) and the HTTP threads (readers).
pub(crate) struct StatusBoard {
    inner: Mutex<Snapshot>,
    late_after_s: f64,
}

impl StatusBoard {
    pub(crate) fn new(
        job: &str,
        world_size: usize,
        max_steps: u64,
        heartbeat_interval_s: f64,
    ) -> StatusBoard {
        StatusBoard {
            inner: Mutex::new(Snapshot {
                job: job.to_string(),
                state: "waiting",
                error: None,
                generation: 0,
                world_size,
                step: None,
                max_steps,
                epoch: None,
                loss: None,
                tokens_per_s: None,
                last_eval: None,
                last_checkpoint: None,
                restarts: 0,
                workers: Vec::new(),
                loss_history: Vec::new(),
                started: Instant::now(),
            }),
            late_after_s: 3.0 * heartbeat_interval_s,
        }
    }

    /// Runs `f` on the snapshot under the lock. A poisoned lock (a panic elsewhere while
    /// holding it) still holds consistent plain data, so it is used rather than propagated.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub(crate) fn record_loss(&self, step: u64, loss: f64) {
        self.update(|s| {
            s.loss_history.push((step, loss));
            if s.loss_history.len() > MAX_HISTORY {
                let kept = s.loss_history.iter().copied().step_by(2).collect();
                s.loss_history = kept;
            }
        });
    }

    fn health(&self, w: &WorkerView, now: Instant) -> Health {
        if w.done {
            Health::Done
        } else if w.gone {
            Health::Lost
        } else if now.duration_since(w.last_heard).as_secs_f64() > self.late_after_s {
            Health::Late
        } else {
            Health::Ok
        }
    }

    /// `GET /status`.
    pub(crate) fn to_json(&self) -> Value {
        let now = Instant::now();
        self.update(|s| {
            let workers: Vec<Value> = s
                .workers
                .iter()
                .map(|w| {
                    json!({
                        "rank": w.rank,
                        "host": w.host,
                        "peer": w.peer,
                        "last_heartbeat_age_s": now.duration_since(w.last_heard).as_secs_f64(),
                        "last_step": w.last_step,
                        "health": health_name(self.health(w, now)),
                    })
                })
                .collect();
            json!({
                "job": s.job,
                "state": s.state,
                "error": s.error,
                "generation": s.generation,
                "world_size": s.world_size,
                "step": s.step,
                "max_steps": s.max_steps,
                "epoch": s.epoch,
                "loss": s.loss,
                "tokens_per_s": s.tokens_per_s,
                "last_eval": s.last_eval,
                "last_checkpoint": s.last_checkpoint,
                "restarts": s.restarts,
                "uptime_s": now.duration_since(s.started).as_secs_f64(),
                "workers": workers,
                "loss_history": s.loss_history,
            })
        })
    }

    /// `GET /metrics`, Prometheus text exposition format.
    pub(crate) fn to_prometheus(&self) -> String {
        let now = Instant::now();
        self.update(|s| {
            let mut out = String::new();
            let job = escape_label(&s.job);
            let mut gauge = |name: &str, help: &str, value: Option<f64>| {
                let _ = writeln!(out, "# HELP bertrain_{name} {help}\n# TYPE bertrain_{name} gauge");
                if let Some(v) = value {
                    let _ = writeln!(out, "bertrain_{name}{{job=\"{job}\"}} {v}");
                }
            };
            gauge("step", "Last optimizer step completed by every rank.", s.step.map(|v| v as f64));
            gauge("max_steps", "Optimizer steps the job runs.", Some(s.max_steps as f64));
            gauge("epoch", "Epoch of the last completed step.", s.epoch.map(|v| v as f64));
            gauge("loss", "Training loss of the last step, mean over ranks.", s.loss);
            gauge("tokens_per_second", "Training throughput of the last step, sum over ranks.", s.tokens_per_s);
            gauge("generation", "How many times the worker set has been (re)started.", Some(s.generation as f64));
            gauge("world_size", "Workers the job runs with.", Some(s.world_size as f64));
            gauge("last_checkpoint_step", "Step of the newest committed checkpoint.", s.last_checkpoint.map(|v| v as f64));
            gauge("restarts", "Generations restarted after a lost or failed worker.", Some(f64::from(s.restarts)));
            let running = match s.state {
                "running" => 1.0,
                _ => 0.0,
            };
            gauge("running", "1 while the job is training.", Some(running));
            let _ = writeln!(
                out,
                "# HELP bertrain_worker_heartbeat_age_seconds Seconds since the worker was last heard from.\n\
                 # TYPE bertrain_worker_heartbeat_age_seconds gauge"
            );
            for w in &s.workers {
                let _ = writeln!(
                    out,
                    "bertrain_worker_heartbeat_age_seconds{{job=\"{job}\",rank=\"{}\",host=\"{}\",health=\"{}\"}} {}",
                    w.rank.map_or_else(|| "none".to_string(), |r| r.to_string()),
                    escape_label(&w.host),
                    health_name(self.health(w, now)),
                    now.duration_since(w.last_heard).as_secs_f64()
                );
            }
            out
        })
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Late => "late",
        Health::Done => "done",
        Health::Lost => "lost",
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_stays_bounded_and_ordered() {
        let board = StatusBoard::new("j", 1, 10_000, 1.0);
        for step in 0..10_000u64 {
            board.record_loss(step, step as f64);
        }
        let history = board.update(|s| s.loss_history.clone());
        assert!(history.len() <= MAX_HISTORY);
        assert!(history.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(history[0].0, 0);
    }

    #[test]
    fn prometheus_has_types_and_escaped_labels() {
        let board = StatusBoard::new("a\"b", 1, 10, 1.0);
        board.update(|s| {
            s.step = Some(3);
            s.workers.push(WorkerView {
                rank: Some(0),
                host: "h".into(),
                peer: "p".into(),
                last_heard: Instant::now(),
                last_step: Some(3),
                gone: false,
                done: false,
            })
        });
        let text = board.to_prometheus();
        assert!(text.contains("# TYPE bertrain_step gauge"));
        assert!(text.contains("bertrain_step{job=\"a\\\"b\"} 3"), "{text}");
        assert!(
            text.contains("rank=\"0\",host=\"h\",health=\"ok\""),
            "{text}"
        );
        let json = board.to_json();
        assert_eq!(json["workers"][0]["health"], "ok");
    }
}
