//! The output directory: made ready (a previous dataset replaced only with `--overwrite`, nothing else touched) and given the vocabulary.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bertrain_files::{TOKENIZER_CONFIG_FILE, VOCAB_FILE, write_atomically};

use crate::manifest::MANIFEST_FILE;
use crate::vocab::Vocab;

use super::VALIDATION_DIR;

/// Makes `dir` ready for a new dataset. An existing dataset (or the leftovers of a run that
/// crashed) is removed only with `overwrite`, manifest first, so no manifest ever names a
/// deleted shard. A directory holding anything dataprep did not write is never touched.
pub(super) fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
    if !dir.exists() {
        return fs::create_dir_all(dir)
            .with_context(|| format!("creating output directory {}", dir.display()));
    }
    if !dir.is_dir() {
        bail!(
            "output {} exists and is not a directory; choose a directory path",
            dir.display()
        );
    }
    let mut ours = Vec::new();
    for (path, in_validation) in dataset_entries(dir)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let recognised =
            is_dataset_file(&name) || (!in_validation && name == VALIDATION_DIR && path.is_dir());
        if !recognised {
            bail!(
                "output directory {} holds {} which bertrain dataprep did not write; choose an empty or new directory",
                dir.display(),
                path.display()
            );
        }
        ours.push(path);
    }
    if ours.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "output directory {} already holds a dataset; pass --overwrite to replace it or choose a new directory",
            dir.display()
        );
    }
    // Manifests first: from here on the directory no longer claims to be a dataset.
    for m in [
        dir.join(VALIDATION_DIR).join(MANIFEST_FILE),
        dir.join(MANIFEST_FILE),
    ] {
        if m.exists() {
            fs::remove_file(&m).with_context(|| format!("removing {}", m.display()))?;
        }
    }
    bertrain_files::sync_dir(dir)?;
    ours.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in ours {
        if p.is_dir() {
            fs::remove_dir(&p)
        } else if p.exists() {
            fs::remove_file(&p)
        } else {
            Ok(())
        }
        .with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Entries of `dir` and of `dir/validation` (flagged), which is all dataprep ever writes.
pub(super) fn dataset_entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let list = |d: &Path| -> Result<Vec<PathBuf>> {
        Ok(fs::read_dir(d)
            .with_context(|| format!("listing {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect())
    };
    let mut out = Vec::new();
    for p in list(dir)? {
        let is_val = p.file_name().is_some_and(|n| n == VALIDATION_DIR) && p.is_dir();
        if is_val {
            out.extend(list(&p)?.into_iter().map(|q| (q, true)));
        }
        out.push((p, false));
    }
    Ok(out)
}

pub(super) fn is_dataset_file(name: &str) -> bool {
    name == MANIFEST_FILE
        || name == VOCAB_FILE
        || name == TOKENIZER_CONFIG_FILE
        || (name.starts_with("shard-") && name.ends_with(".parquet"))
        || (name.starts_with('.') && name.ends_with(".tmp"))
}

/// Copies the vocabulary (and its lowercasing) into the dataset so it is self-contained.
pub(super) fn copy_vocab(vocab: &Vocab, bytes: &[u8], dir: &Path) -> Result<()> {
    write_atomically(&dir.join(VOCAB_FILE), bytes)?;
    write_atomically(
        &dir.join(TOKENIZER_CONFIG_FILE),
        vocab.casing.tokenizer_config_json().as_bytes(),
    )
}
