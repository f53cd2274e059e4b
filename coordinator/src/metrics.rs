//! Per-step metrics: gathering every rank's report, merging them, and the JSONL log.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::protocol::{EvalMetrics, StepMetrics};

/// Collects one report per rank for each step; hands back the set once it is complete.
pub(crate) struct Gather<T> {
    world: usize,
    pending: BTreeMap<u64, Vec<Option<T>>>,
}

impl<T> Gather<T> {
    pub(crate) fn new(world: usize) -> Self {
        Gather {
            world,
            pending: BTreeMap::new(),
        }
    }

    /// Records `rank`'s report for `step`; returns all ranks' reports when this was the last.
    pub(crate) fn add(&mut self, step: u64, rank: usize, report: T) -> Option<Vec<T>> {
        let slots = self
            .pending
            .entry(step)
            .or_insert_with(|| (0..self.world).map(|_| None).collect());
        slots[rank] = Some(report);
        if slots.iter().all(Option::is_some) {
            let slots = self.pending.remove(&step)?;
            return Some(slots.into_iter().flatten().collect());
        }
        None
    }
}

/// Merges the ranks' step reports: means, except throughput, which adds up.
pub(crate) fn merge_steps(reports: &[StepMetrics]) -> StepMetrics {
    let n = reports.len().max(1) as f64;
    let mean = |f: fn(&StepMetrics) -> f64| reports.iter().map(f).sum::<f64>() / n;
    StepMetrics {
        step: reports.first().map_or(0, |r| r.step),
        loss: mean(|r| r.loss),
        mlm_loss: mean(|r| r.mlm_loss),
        nsp_loss: mean(|r| r.nsp_loss),
        mlm_accuracy: mean(|r| r.mlm_accuracy),
        nsp_accuracy: mean(|r| r.nsp_accuracy),
        lr: mean(|r| r.lr),
        tokens_per_s: reports.iter().map(|r| r.tokens_per_s).sum(),
        step_time_s: mean(|r| r.step_time_s),
        data_wait_s: mean(|r| r.data_wait_s),
        comm_s: mean(|r| r.comm_s),
        padding_fraction: mean(|r| r.padding_fraction),
        world: reports.first().map_or(0, |r| r.world),
    }
}

/// Merges the ranks' evaluations, weighting each by the samples it covered (ranks may get
/// unequal parts of the validation split); perplexity is recomputed from the merged loss.
pub(crate) fn merge_evals(reports: &[EvalMetrics]) -> EvalMetrics {
    let total: u64 = reports.iter().map(|r| r.samples).sum();
    let weight = |r: &EvalMetrics| {
        if total == 0 {
            1.0 / reports.len().max(1) as f64
        } else {
            r.samples as f64 / total as f64
        }
    };
    let mean = |f: fn(&EvalMetrics) -> f64| reports.iter().map(|r| f(r) * weight(r)).sum::<f64>();
    let mlm_loss = mean(|r| r.mlm_loss);
    EvalMetrics {
        step: reports.first().map_or(0, |r| r.step),
        loss: mean(|r| r.loss),
        mlm_loss,
        nsp_loss: mean(|r| r.nsp_loss),
        mlm_accuracy: mean(|r| r.mlm_accuracy),
        nsp_accuracy: mean(|r| r.nsp_accuracy),
        perplexity: mlm_loss.exp(),
        samples: total,
    }
}

/// `run_dir/metrics.jsonl`: one JSON object per step, one per evaluation.
pub(crate) struct MetricsLog {
    file: File,
    path: PathBuf,
    /// The newest step with a line in the log.
    last_step: Option<u64>,
}

impl MetricsLog {
    /// Opens the log for a run that has `start_step` steps behind it: lines of later steps
    /// (left by a run that went further than the checkpoint it is resumed from) are dropped
    /// so the log reads as one uninterrupted run. The rewrite goes through a temporary file.
    pub(crate) fn open(path: &Path, start_step: u64) -> Result<MetricsLog> {
        let mut last_step = None;
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|step| step <= start_step)
                })
                .map(|line| format!("{line}\n"))
                .collect();
            last_step = kept
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|v| v.get("split").is_none())
                .filter_map(|v| v.get("step").and_then(Value::as_u64))
                .max();
            let temp = path.with_extension("jsonl.tmp");
            std::fs::write(&temp, kept).with_context(|| format!("writing {}", temp.display()))?;
            std::fs::rename(&temp, path)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
            last_step,
        })
    }

    /// Whether the log has the line of training step `step` already.
    pub(crate) fn has_step(&self, step: u64) -> bool {
        self.last_step.is_some_and(|last| step <= last)
    }

    /// Logs a step. `ranks` is how many ranks' shares `m` merges: fewer than the world
    /// that ran the step (a survivor's re-sent report whose peers' reports were lost with
    /// them) marks the line `"partial"`, since its figures cover only part of the batch.
    pub(crate) fn write_step(&mut self, m: &StepMetrics, ranks: usize) -> Result<()> {
        self.last_step = Some(m.step);
        let mut line = json!({
            "step": m.step,
            "loss": m.loss,
            "mlm_loss": m.mlm_loss,
            "nsp_loss": m.nsp_loss,
            "mlm_accuracy": m.mlm_accuracy,
            "nsp_accuracy": m.nsp_accuracy,
            "lr": m.lr,
            "tokens_per_s": m.tokens_per_s,
            "step_time_s": m.step_time_s,
            "data_wait_s": m.data_wait_s,
            "comm_s": m.comm_s,
            "padding_fraction": m.padding_fraction,
            "time": unix_time(),
        });
        if ranks < m.world {
            line["partial"] = json!(format!("{ranks} of {} ranks", m.world));
        }
        self.write(line)
    }

    pub(crate) fn write_eval(&mut self, m: &EvalMetrics) -> Result<()> {
        self.write(json!({
            "split": "validation",
            "step": m.step,
            "loss": m.loss,
            "mlm_loss": m.mlm_loss,
            "nsp_loss": m.nsp_loss,
            "mlm_accuracy": m.mlm_accuracy,
            "nsp_accuracy": m.nsp_accuracy,
            "perplexity": m.perplexity,
            "samples": m.samples,
            "time": unix_time(),
        }))
    }

    fn write(&mut self, line: Value) -> Result<()> {
        // One write per line, so a reader tailing the file never sees half a line.
        let mut text = line.to_string();
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_waits_for_every_rank() {
        let mut g = Gather::new(3);
        assert!(g.add(5, 0, 'a').is_none());
        assert!(g.add(5, 2, 'c').is_none());
        assert!(g.add(6, 0, 'x').is_none());
        assert_eq!(g.add(5, 1, 'b'), Some(vec!['a', 'b', 'c']));
    }

    #[test]
    fn merge_means_and_sums() {
        let a = StepMetrics {
            step: 1,
            loss: 2.0,
            tokens_per_s: 100.0,
            ..Default::default()
        };
        let b = StepMetrics {
            step: 1,
            loss: 4.0,
            tokens_per_s: 50.0,
            ..Default::default()
        };
        let m = merge_steps(&[a, b]);
        assert_eq!((m.step, m.loss, m.tokens_per_s), (1, 3.0, 150.0));
        let a = EvalMetrics {
            mlm_loss: 1.0,
            mlm_accuracy: 0.5,
            samples: 30,
            ..Default::default()
        };
        let b = EvalMetrics {
            mlm_loss: 3.0,
            mlm_accuracy: 0.1,
            samples: 10,
            ..Default::default()
        };
        let m = merge_evals(&[a, b]);
        assert!((m.mlm_loss - 1.5).abs() < 1e-12);
        assert!((m.mlm_accuracy - 0.4).abs() < 1e-12);
        assert!((m.perplexity - 1.5f64.exp()).abs() < 1e-9);
        assert_eq!(m.samples, 40);
    }

    #[test]
    fn reopening_drops_steps_after_the_resume_point() {
        let dir = std::env::temp_dir().join(format!("bertrain-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 0..5 {
            log.write_step(
                &StepMetrics {
                    step,
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        }
        log.write_eval(&EvalMetrics {
            step: 4,
            ..Default::default()
        })
        .unwrap();
        drop(log);
        let _ = MetricsLog::open(&path, 2).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![0, 1, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_step_merged_from_fewer_ranks_than_ran_it_is_marked_partial() {
        let dir = std::env::temp_dir().join(format!("bertrain-partial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        let report = |step| StepMetrics {
            step,
            world: 2,
            ..Default::default()
        };
        log.write_step(&merge_steps(&[report(1), report(1)]), 2)
            .unwrap();
        log.write_step(&merge_steps(&[report(2)]), 1).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let partial: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["partial"].clone())
            .collect();
        assert_eq!(partial, [Value::Null, Value::from("1 of 2 ranks")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
