//! The checkpoint directory: layout, commit protocol, verification, `latest`, pruning.
//!
//! ```text
//! run_dir/checkpoints/
//!   latest                      names the newest committed step directory (atomic replace)
//!   step-00000100/
//!     model.safetensors         HF BertForPreTraining names: exports or loads directly
//!     optimizer.safetensors     first and second moments, by parameter name
//!     trainer.json              step, epoch, data position, schedule, seeds, world size, hashes
//!     config.json  vocab.txt    so the directory is a complete HF model directory
//!     checksums.sha256          SHA-256 of every file above
//!     COMMITTED                 written last: without it the directory is not a checkpoint
//! ```
//!
//! The writer (rank 0) builds the directory under a temporary name, writes and fsyncs every
//! file, then the checksum list, then the commit marker, and renames the directory into
//! place. The coordinator then records the commit in its journal, replaces `latest`, and
//! prunes old checkpoints. Readers trust only a directory whose marker exists and whose
//! files match their checksums; a damaged newest checkpoint is reported and the previous
//! one is used.

use std::fs;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
pub use bertrain_files::{CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE};
use bertrain_files::{sha256_file, sync_dir, write_atomically, write_synced};
use serde::{Deserialize, Serialize};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
pub const CHECKSUMS_FILE: &str = "checksums.sha256";
pub const COMMIT_MARKER: &str = "COMMITTED";
pub const LATEST_FILE: &str = "latest";

/// Files every checkpoint holds (besides the checksum list and the marker).
pub const CHECKPOINT_FILES: &[&str] = &[
    WEIGHTS_FILE,
    OPTIMIZER_FILE,
    TRAINER_FILE,
    CONFIG_FILE,
    VOCAB_FILE,
];

/// `trainer.json`: everything beside the tensors that a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the next sample to read.
    pub epoch: u64,
    /// The data position: global samples consumed since the job started (`step *
    /// global_batch_size`; the data order is a pure function of it, see the worker's `plan`).
    pub samples_consumed: u64,
    pub global_batch_size: u64,
    /// Learning rate of the last step taken (the schedule is a pure function of the step).
    pub lr: f64,
    /// The job's seed: initialisation, data order and dropout streams derive from it and
    /// the step, so no generator state needs saving.
    pub seed: u64,
    /// World size of the run that wrote the checkpoint (a resume may use another).
    pub world_size: usize,
    /// Hash of the job settings that must not change across a resume (model, batch, seed).
    pub job_hash: String,
    /// `Manifest::content_hash()` of the training data.
    pub dataset_hash: String,
}

pub const TRAINER_FORMAT_VERSION: u32 = 1;

/// `run_dir/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The directory name of step `step`'s checkpoint.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint directory name, if it is one.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes the checksum list (of every file in `dir`) and then the commit marker into
/// `dir`, which must hold every file of [`CHECKPOINT_FILES`], already synced.
pub fn seal(dir: &Path, step: u64) -> Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name != CHECKSUMS_FILE && name != COMMIT_MARKER {
            names.push(name);
        }
    }
    names.sort();
    for required in CHECKPOINT_FILES {
        if !names.iter().any(|n| n == required) {
            bail!(
                "{}: {required} is missing; not sealing an incomplete checkpoint",
                dir.display()
            );
        }
    }
    let mut list = String::new();
    for name in &names {
        let (digest, _) = sha256_file(&dir.join(name))?;
        list += &format!("{digest}  {name}\n");
    }
    write_synced(&dir.join(CHECKSUMS_FILE), list.as_bytes())?;
    write_synced(&dir.join(COMMIT_MARKER), format!("{step}\n").as_bytes())?;
    sync_dir(dir)
}

/// Checks that `dir` is a complete, undamaged checkpoint and returns its trainer state.
/// The error says what is wrong (no marker, a missing file, a checksum mismatch).
pub fn verify(dir: &Path) -> Result<TrainerState> {
    if !dir.join(COMMIT_MARKER).is_file() {
        bail!(
            "{}: no {COMMIT_MARKER} marker (an interrupted write)",
            dir.display()
        );
    }
    let list_path = dir.join(CHECKSUMS_FILE);
    let list = fs::read_to_string(&list_path)
        .with_context(|| format!("{}: cannot read", list_path.display()))?;
    let mut listed = Vec::new();
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let Some((digest, name)) = line.split_once("  ") else {
            bail!("{}: malformed line {line:?}", list_path.display());
        };
        let path = dir.join(name);
        let (actual, _) = sha256_file(&path)
            .with_context(|| format!("{}: listed file is unreadable", dir.display()))?;
        if actual != digest {
            bail!(
                "{}: checksum mismatch (the file is damaged)",
                path.display()
            );
        }
        listed.push(name.to_string());
    }
    for name in CHECKPOINT_FILES {
        if !listed.iter().any(|l| l == name) {
            bail!("{}: {name} is not in {CHECKSUMS_FILE}", dir.display());
        }
    }
    read_trainer_state(dir)
}

pub fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_FILE);
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bertrain trainer state", path.display()))?;
    if state.format_version != TRAINER_FORMAT_VERSION {
        bail!(
            "{}: format version {} (this build reads {TRAINER_FORMAT_VERSION})",
            path.display(),
            state.format_version
        );
    }
    Ok(state)
}

/// A checkpoint found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// The newest valid committed checkpoint under `checkpoints` (newest by step). Damaged or
/// incomplete newer ones are skipped, each reported through `report`.
pub fn newest_valid(checkpoints: &Path, report: &mut dyn FnMut(String)) -> Result<Option<Found>> {
    for (step, dir) in step_dirs(checkpoints)?.into_iter().rev() {
        match verify(&dir) {
            Ok(state) if state.step == step => return Ok(Some(Found { dir, state })),
            Ok(state) => report(format!(
                "checkpoint {} says it is step {}; skipping it",
                dir.display(),
                state.step
            )),
            Err(e) => report(format!("skipping checkpoint {}: {e:#}", dir.display())),
        }
    }
    Ok(None)
}

/// Step directories under `checkpoints`, oldest first (temporary directories excluded).
pub fn step_dirs(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(checkpoints) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", checkpoints.display())),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_step_dir)
            && entry.file_type()?.is_dir()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The directory a model is read from, for commands that take `--model DIR`: an HF
/// directory or a checkpoint as it is (both hold a `config.json`), a run or checkpoints
/// directory as its newest checkpoint.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    resolve(path)
}

/// The checkpoint a user means by `path`: a step directory itself, or the one `latest`
/// names in a checkpoints directory or in a run directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(COMMIT_MARKER).exists() || path.join(TRAINER_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    for checkpoints in [path.to_path_buf(), checkpoints_dir(path)] {
        if let Some(step) = latest_step(&checkpoints)? {
            return Ok(checkpoints.join(step_dir_name(step)));
        }
    }
    bail!(
        "{} is not a checkpoint (no {COMMIT_MARKER}), nor a run or checkpoints directory with a `latest` file",
        path.display()
    )
}

/// Replaces `checkpoints/latest` so that it names `step`'s directory: write, fsync, rename.
pub fn set_latest(checkpoints: &Path, step: u64) -> Result<()> {
    write_atomically(
        &checkpoints.join(LATEST_FILE),
        format!("{}\n", step_dir_name(step)).as_bytes(),
    )
}

/// The step `checkpoints/latest` names, if the file exists.
pub fn latest_step(checkpoints: &Path) -> Result<Option<u64>> {
    let path = checkpoints.join(LATEST_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_step_dir(text.trim())
            .map(Some)
            .with_context(|| format!("{} does not name a step directory", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Deletes committed checkpoints older than the newest `keep` committed ones, and
/// uncommitted leftovers older than the newest committed one. The newest committed
/// checkpoint and anything newer are never touched. Returns what was removed.
pub fn prune(checkpoints: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let dirs = step_dirs(checkpoints)?;
    let committed: Vec<u64> = dirs
        .iter()
        .filter(|(_, d)| d.join(COMMIT_MARKER).is_file())
        .map(|(s, _)| *s)
        .collect();
    let Some(&newest) = committed.last() else {
        return Ok(Vec::new());
    };
    let keep_from = committed[committed.len().saturating_sub(keep.max(1))];
    let mut removed = Vec::new();
    for (step, dir) in dirs {
        let is_committed = committed.contains(&step);
        let old = if is_committed {
            step < keep_from
        } else {
            step < newest
        };
        if old {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bertrain-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn state(step: u64) -> TrainerState {
        TrainerState {
            format_version: TRAINER_FORMAT_VERSION,
            step,
            epoch: 0,
            samples_consumed: step * 8,
            global_batch_size: 8,
            lr: 1e-4,
            seed: 1,
            world_size: 2,
            job_hash: "j".into(),
            dataset_hash: "d".into(),
        }
    }

    /// A fake checkpoint (the files' contents do not matter to the commit protocol).
    fn fake(checkpoints: &Path, step: u64, commit: bool) -> PathBuf {
        let dir = checkpoints.join(step_dir_name(step));
        fs::create_dir_all(&dir).unwrap();
        for name in CHECKPOINT_FILES {
            let bytes = if *name == TRAINER_FILE {
                serde_json::to_vec(&state(step)).unwrap()
            } else {
                format!("{name} of step {step}").into_bytes()
            };
            write_synced(&dir.join(name), &bytes).unwrap();
        }
        if commit {
            seal(&dir, step).unwrap();
        }
        dir
    }

    #[test]
    fn damaged_or_uncommitted_newest_falls_back_to_the_previous() {
        let root = tempdir("fallback");
        fake(&root, 100, true);
        let second = fake(&root, 200, true);
        fake(&root, 300, false);
        let mut reports = Vec::new();
        let found = newest_valid(&root, &mut |r| reports.push(r))
            .unwrap()
            .unwrap();
        assert_eq!(found.state.step, 200);
        assert!(reports[0].contains("no COMMITTED marker"), "{reports:?}");

        // Corrupt one byte of the step-200 model: fall back to 100, naming the file.
        let model = second.join(WEIGHTS_FILE);
        let mut bytes = fs::read(&model).unwrap();
        bytes[0] ^= 1;
        fs::write(&model, bytes).unwrap();
        reports.clear();
        let found = newest_valid(&root, &mut |r| reports.push(r))
            .unwrap()
            .unwrap();
        assert_eq!(found.state.step, 100);
        assert!(
            reports
                .iter()
                .any(|r| r.contains("model.safetensors") && r.contains("checksum")),
            "{reports:?}"
        );

        // A truncated (missing) file is reported too.
        fs::remove_file(root.join(step_dir_name(100)).join(OPTIMIZER_FILE)).unwrap();
        assert!(newest_valid(&root, &mut |_| {}).unwrap().is_none());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn prune_keeps_the_newest_committed_and_anything_newer() {
        let root = tempdir("prune");
        for step in [10, 20, 30, 40] {
            fake(&root, step, true);
        }
        fake(&root, 5, false); // leftover of an interrupted write
        fake(&root, 50, false); // being written right now
        let removed = prune(&root, 2).unwrap();
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(names, ["step-00000005", "step-00000010", "step-00000020"]);
        let left: Vec<u64> = step_dirs(&root)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, [30, 40, 50]);
        // keep_last 0 is treated as 1: the newest committed one stays.
        prune(&root, 0).unwrap();
        let left: Vec<u64> = step_dirs(&root)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, [40, 50]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn latest_is_replaced_atomically() {
        let root = tempdir("latest");
        assert_eq!(latest_step(&root).unwrap(), None);
        set_latest(&root, 7).unwrap();
        set_latest(&root, 12).unwrap();
        assert_eq!(latest_step(&root).unwrap(), Some(12));
        assert_eq!(
            fs::read_to_string(root.join(LATEST_FILE)).unwrap(),
            "step-00000012\n"
        );
        let leftovers = fs::read_dir(&root).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn step_dir_names_round_trip() {
        assert_eq!(parse_step_dir(&step_dir_name(42)), Some(42));
        assert_eq!(parse_step_dir("step-1"), None);
        assert_eq!(parse_step_dir("step-00000042.tmp"), None);
    }
}
