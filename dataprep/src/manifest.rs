//! `manifest.json`: the index of a dataset directory.
//!
//! The manifest is the last file dataprep writes (via a temporary name and a rename), so a
//! directory whose manifest exists names only complete shards. Readers call
//! [`Manifest::verify_files`] before trusting it: sizes and SHA-256 of every shard must match.

use std::fs;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bertrain_files::{hex, sha256_file, write_atomically};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped whenever the meaning of a column or manifest field changes.
pub const FORMAT_VERSION: u32 = 1;

/// The options instances were generated with (everything that changes the bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedOptions {
    pub masked_lm_prob: f64,
    pub short_seq_prob: f64,
    pub dupe_factor: usize,
    pub whole_word_mask: bool,
    pub seed: u64,
    pub shard_rows: usize,
    pub row_group_rows: usize,
    /// Documents are grouped into windows of about this many bytes of text; the random
    /// document of a NotNext pair is drawn from the same window (see `pipeline`).
    pub window_bytes: usize,
    /// A window's instances are made and shuffled in slices of documents holding about this
    /// many tokens (absent in manifests from before slices; they shuffled whole windows).
    #[serde(default)]
    pub slice_tokens: usize,
    pub validation_fraction: f64,
    pub lowercase: bool,
    /// What decided `lowercase` (absent in manifests from before it was recorded).
    #[serde(default)]
    pub casing: String,
}

/// Counts over the whole run, also printed as the final summary table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub input_bytes: u64,
    pub documents: u64,
    pub sentences: u64,
    pub instances: u64,
    pub tokens: u64,
    pub masked_tokens: u64,
    pub is_next: u64,
    pub not_next: u64,
    pub empty_documents_skipped: u64,
    pub single_sentence_documents: u64,
    pub invalid_utf8_lines_skipped: u64,
    pub long_lines_truncated: u64,
    pub malformed_records_skipped: u64,
    pub long_documents_split: u64,
    pub validation_documents: u64,
    /// WordPiece tokens of the split's documents (each counted once, before duplication
    /// into instances), and how many of them are `[UNK]` (absent in older manifests).
    #[serde(default)]
    pub text_tokens: u64,
    #[serde(default)]
    pub unk_tokens: u64,
}

impl Totals {
    /// The share of the text's tokens that are `[UNK]`: words the vocabulary cannot spell.
    pub fn unk_share(&self) -> f64 {
        self.unk_tokens as f64 / self.text_tokens.max(1) as f64
    }
}

/// One Parquet file of the dataset; `file` is relative to the manifest's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    /// What the split holds: "train" or "validation".
    pub split: String,
    pub shards: Vec<ShardEntry>,
    pub vocab_size: usize,
    pub vocab_sha256: String,
    pub max_seq_len: usize,
    pub max_predictions: usize,
    pub options: RecordedOptions,
    pub inputs: Vec<String>,
    /// The vocabulary, copied into the dataset directory so the dataset is self-contained.
    pub vocab_file: String,
    pub totals: Totals,
    /// Path of the validation split's manifest relative to this one, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_manifest: Option<String>,
    #[serde(skip)]
    dir: PathBuf,
}

impl Manifest {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dir: &Path,
        split: &str,
        shards: Vec<ShardEntry>,
        vocab_size: usize,
        vocab_sha256: String,
        max_seq_len: usize,
        max_predictions: usize,
        options: RecordedOptions,
        inputs: Vec<String>,
        vocab_file: String,
        totals: Totals,
    ) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            created_by: format!("bertrain-dataprep {}", env!("CARGO_PKG_VERSION")),
            split: split.to_string(),
            shards,
            vocab_size,
            vocab_sha256,
            max_seq_len,
            max_predictions,
            options,
            inputs,
            vocab_file,
            totals,
            validation_manifest: None,
            dir: dir.to_path_buf(),
        }
    }

    pub(crate) fn set_validation_manifest(&mut self, relative: Option<String>) {
        self.validation_manifest = relative;
    }

    /// Loads `path`, which is either the manifest file or the dataset directory holding it.
    pub fn load(path: &Path) -> Result<Manifest> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = fs::read_to_string(&file).with_context(|| {
            format!(
                "reading dataset manifest {} (run `bertrain dataprep` to create a dataset)",
                file.display()
            )
        })?;
        let mut manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing dataset manifest {}", file.display()))?;
        if manifest.format_version != FORMAT_VERSION {
            bail!(
                "dataset manifest {} has format_version {}, this build reads {}; re-run `bertrain dataprep`",
                file.display(),
                manifest.format_version,
                FORMAT_VERSION
            );
        }
        manifest.dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(manifest)
    }

    /// The directory shard file names are relative to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Absolute-or-relative path of a shard, joined onto [`Manifest::dir`].
    pub fn shard_path(&self, shard: &ShardEntry) -> PathBuf {
        self.dir.join(&shard.file)
    }

    /// Checks that every shard exists with the recorded size and SHA-256.
    pub fn verify_files(&self) -> Result<()> {
        for shard in &self.shards {
            let path = self.shard_path(shard);
            let meta = fs::metadata(&path).with_context(|| {
                format!(
                    "dataset shard {} named in the manifest is missing; re-run `bertrain dataprep`",
                    path.display()
                )
            })?;
            if meta.len() != shard.bytes {
                bail!(
                    "dataset shard {} is {} bytes but the manifest says {}; the dataset is damaged, re-run `bertrain dataprep`",
                    path.display(),
                    meta.len(),
                    shard.bytes
                );
            }
            let (digest, _) = sha256_file(&path)?;
            if digest != shard.sha256 {
                bail!(
                    "dataset shard {} does not match the SHA-256 in its manifest; the dataset is damaged, re-run `bertrain dataprep`",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// [`Manifest::load`] followed by [`Manifest::verify_files`]: what training opens.
    pub fn load_verified(path: &Path) -> Result<Manifest> {
        let manifest = Manifest::load(path)?;
        manifest.verify_files().with_context(|| {
            format!(
                "refusing to train: dataset {} does not match its manifest",
                path.display()
            )
        })?;
        Ok(manifest)
    }

    pub fn total_rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }

    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tokens).sum()
    }

    /// A hash identifying the dataset's content: the vocab, the sequence limits and every
    /// shard's checksum in order. Two directories with the same content hash hold the same rows.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "v{};vocab={};size={};seq={};pred={};",
            self.format_version,
            self.vocab_sha256,
            self.vocab_size,
            self.max_seq_len,
            self.max_predictions
        ));
        for s in &self.shards {
            h.update(format!("{}:{}:{};", s.file, s.rows, s.sha256));
        }
        hex(&h.finalize())
    }

    /// Writes the manifest into `dir` through a temporary name, fsyncs, renames.
    pub(crate) fn write(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("serialising manifest")?;
        write_atomically(&self.dir.join(MANIFEST_FILE), text.as_bytes())
    }
}
