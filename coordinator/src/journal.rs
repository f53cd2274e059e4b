//! `run_dir/journal.jsonl`: the coordinator's append-only record of what happened to the
//! job (generations started and failed, checkpoints committed, the end), one JSON object
//! per line, each fsynced. A restarted coordinator reads it back to check that the newest
//! checkpoint it committed is still there.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "journal.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Entry {
    /// A coordinator process took charge of the job.
    CoordinatorStarted {
        start_step: u64,
        resumed_from: Option<PathBuf>,
    },
    GenerationStarted {
        generation: u64,
        start_step: u64,
        world_size: usize,
        /// Where the starting state came from: the initial model, a checkpoint, or a rank
        /// that kept it.
        #[serde(default)]
        source: String,
        /// The step of the state each rank kept from the generation before, if any.
        #[serde(default)]
        held: Vec<Option<u64>>,
    },
    GenerationFailed {
        generation: u64,
        reason: String,
        restart: u32,
        /// The newest step any rank of the generation reported.
        #[serde(default)]
        last_step: Option<u64>,
    },
    /// The ranks left the generation after `step` to take waiting workers in.
    GenerationRegrouped {
        generation: u64,
        step: u64,
    },
    CheckpointCommitted {
        step: u64,
        dir: PathBuf,
        seconds: f64,
    },
    CheckpointFailed {
        step: u64,
        reason: String,
    },
    JobFinished {
        step: u64,
    },
    JobStopped {
        reason: String,
    },
}

pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    pub fn open(run_dir: &Path) -> Result<Journal> {
        let path = run_dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the job journal {}", path.display()))?;
        Ok(Journal { file, path })
    }

    /// Appends `entry` with the wall-clock time (`"time"`, Unix seconds) and fsyncs.
    pub fn append(&mut self, entry: &Entry) -> Result<()> {
        let mut value = serde_json::to_value(entry)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(object) = value.as_object_mut() {
            object.insert("time".into(), now.into());
        }
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write the job journal {}", self.path.display()))
    }
}

/// The entries of `run_dir`'s journal (none if it has none). A torn last line (the
/// coordinator died mid-write) is ignored.
pub fn read(run_dir: &Path) -> Result<Vec<Entry>> {
    let path = run_dir.join(JOURNAL_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The newest checkpoint the journal records as committed.
pub fn last_committed(entries: &[Entry]) -> Option<u64> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::CheckpointCommitted { step, .. } => Some(*step),
            _ => None,
        })
        .max()
}
