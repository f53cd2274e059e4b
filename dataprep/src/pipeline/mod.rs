//! The dataprep run: corpus stream -> windows -> tokenise + generate in parallel -> shards.
//!
//! Streaming and memory: documents are read in *windows* of about `window_bytes` of text
//! (default 4 MiB, ~1000 Wikipedia-sized documents), and tokenised on the pool in small
//! batches while the rest of the window is read (about 4 bytes per token). A window's
//! instances, five times its tokens with the default `--dupe-factor`, are made *slice* by
//! slice: runs of documents holding about [`SLICE_TOKENS`] tokens, each generated (on every
//! thread) and shuffled, then cut into row groups that pool tasks gather, encode and
//! compress (see [`ShardWriter`]); the next slice is made once they are written. Peak memory
//! is one tokenised window, the raw text of the batches being tokenised, one slice of
//! instances, one row group's buffers and encoders per thread and the encoded groups waiting
//! to be appended (at most two per thread), whatever the corpus size.
//!
//! Threads: `--threads` sets the pool that does all the work. One of its threads runs the
//! loop of [`run`] (reads the input, hands out tasks, appends encoded row groups to the
//! files) and joins in the parallel work whenever it would otherwise wait (see
//! [`crate::tasks`]), so `--threads 1` uses one core and `--threads N` at most N.
//!
//! NotNext: the "random other document" is drawn uniformly from the other documents of the
//! same window (and of the same split: validation documents only pair with validation
//! documents), never the document itself. A trailing window with fewer than
//! [`MIN_WINDOW_DOCS`] documents is merged into the one before it, so no window is too small to
//! draw from. A split of a window with a single document yields IsNext pairs only.
//!
//! Determinism: within a window, work is cut into units of (duplication, run of
//! [`UNIT_DOCS`] documents), each with its own RNG seeded from (seed, window, split,
//! duplication, unit). Slices are cut from token counts, a slice's units are collected in
//! order and its rows are shuffled with an RNG seeded from (seed, window, split, slice), then
//! written in that order. Nothing depends on which thread ran what, so the shards are
//! byte-identical for any `--threads`.
//!
//! Validation: a document goes to the validation split when a hash of (seed, its index in the
//! corpus) falls below `validation_fraction`, so whole documents are held out and the choice
//! does not depend on windows or threads.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_files::VOCAB_FILE;

use crate::input::{InputStats, expand_inputs};
use crate::instances::{InstanceBatch, MaskVocab, TokenizedDoc};
use crate::manifest::{MANIFEST_FILE, Manifest, RecordedOptions, ShardEntry, Totals};
use crate::options::DataprepOptions;
use crate::progress::Progress;
use crate::shards::{RowRef, RowSource, ShardWriter};
use crate::vocab::Vocab;
use crate::wordpiece::SentenceTokenizer;

mod output;
mod slicing;
mod windows;

use output::{copy_vocab, prepare_output};
use slicing::{generate_slice, slices};
use windows::{WindowReader, split_window};

/// Documents per unit of parallel work.
pub const UNIT_DOCS: usize = 8;
/// Default tokens of the documents a slice of instances is made from (about 1 MiB of text).
/// A slice's instances (five times its tokens) stay alive until its last row group is
/// encoded, so this sets most of the peak.
/// Text per window by default, in MiB (`--window-mb`).
pub const DEFAULT_WINDOW_MB: usize = 4;

pub const SLICE_TOKENS: usize = 256 * 1024;
/// A final window smaller than this is merged into the previous one.
pub const MIN_WINDOW_DOCS: usize = 64;
/// Subdirectory holding the validation split.
pub const VALIDATION_DIR: &str = "validation";

const SALT_VALIDATION: u64 = 0x7661_6c69;
const SALT_UNIT: u64 = 0x756e_6974;
const SALT_SHUFFLE: u64 = 0x7368_7566;

/// Everything a dataprep run needs (the CLI fills it from flags).
#[derive(Debug, Clone)]
pub struct DataprepConfig {
    pub inputs: Vec<PathBuf>,
    pub vocab: PathBuf,
    pub lowercase: Option<bool>,
    pub output: PathBuf,
    pub options: DataprepOptions,
    pub threads: usize,
    pub window_bytes: usize,
    /// Tokens of the documents each slice of instances is made from (see the module docs).
    pub slice_tokens: usize,
    pub overwrite: bool,
    pub show_progress: bool,
}

impl DataprepConfig {
    /// The default options, all cores, for these paths.
    pub fn new(inputs: Vec<PathBuf>, vocab: PathBuf, output: PathBuf) -> DataprepConfig {
        DataprepConfig {
            inputs,
            vocab,
            lowercase: None,
            output,
            options: DataprepOptions::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            window_bytes: DEFAULT_WINDOW_MB << 20,
            slice_tokens: SLICE_TOKENS,
            overwrite: false,
            show_progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        self.options.validate()?;
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.window_bytes == 0 {
            bail!("--window-mb must be positive");
        }
        if self.slice_tokens == 0 {
            bail!("the slice size must be positive");
        }
        Ok(())
    }
}

/// Manifests written and the run's figures.
#[derive(Debug)]
pub struct DataprepReport {
    pub train: Manifest,
    pub validation: Option<Manifest>,
    pub seconds: f64,
}

/// Above this share of `[UNK]` tokens the vocabulary does not fit the corpus: BERT's own
/// vocabularies leave well under 0.1% of English text unknown.
pub const UNK_WARNING_SHARE: f64 = 0.01;

impl DataprepReport {
    /// One line saying that the vocabulary leaves too much of the text `[UNK]`, the likely
    /// causes and the fix; None when it is below [`UNK_WARNING_SHARE`].
    pub fn unk_warning(&self) -> Option<String> {
        let mut t = self.train.totals.clone();
        if let Some(v) = &self.validation {
            t.text_tokens += v.totals.text_tokens;
            t.unk_tokens += v.totals.unk_tokens;
        }
        let share = t.unk_share();
        if share <= UNK_WARNING_SHARE {
            return None;
        }
        let o = &self.train.options;
        let flag = if o.lowercase {
            "--cased"
        } else {
            "--lowercase"
        };
        Some(format!(
            "{:.1}% of the corpus's tokens are [UNK] (more than {:.0}%): the vocabulary {} does not fit it. \
             Likely causes: its casing (it was used {}; if that is wrong, rerun with {flag}), or a vocabulary \
             made for another language or script (train one on this corpus with `bertrain vocab`)",
            100.0 * share,
            100.0 * UNK_WARNING_SHARE,
            self.train.dir().join(&self.train.vocab_file).display(),
            o.casing
        ))
    }
}

/// The instances of one slice, and the order to write them in.
struct SliceOutput {
    batches: Vec<InstanceBatch>,
    order: Vec<(u32, u32)>,
}

impl RowSource for SliceOutput {
    fn row(&self, i: usize) -> RowRef<'_> {
        let (b, r) = self.order[i];
        self.batches[b as usize].row(r as usize)
    }
}

/// Runs dataprep end to end. The output directory gets its shards, then (validation split
/// first) the manifests, last.
pub fn run(cfg: &DataprepConfig) -> Result<DataprepReport> {
    let started = Instant::now();
    cfg.validate()?;
    let files = expand_inputs(&cfg.inputs)?;
    let input_bytes: u64 = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let vocab = Vocab::load(&cfg.vocab, cfg.lowercase)?;
    let tokenizer = SentenceTokenizer::new(&vocab)?;
    let mask_vocab = MaskVocab::from_vocab(&vocab);
    // Read before the output is prepared: the vocab may be the old dataset's own copy.
    let vocab_bytes = fs::read(&vocab.path)
        .with_context(|| format!("reading vocabulary {}", vocab.path.display()))?;
    prepare_output(&cfg.output, cfg.overwrite)?;
    let val_dir = cfg.output.join(VALIDATION_DIR);
    if cfg.options.validation_fraction > 0.0 {
        fs::create_dir_all(&val_dir).with_context(|| format!("creating {}", val_dir.display()))?;
    }
    copy_vocab(&vocab, &vocab_bytes, &cfg.output)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .thread_name(|i| format!("dataprep-{i}"))
        .build()
        .context("starting worker threads")?;

    // The whole loop runs on the pool, reading and appending included, so `--threads` is the
    // number of threads at work: with one, everything happens on that thread.
    let tokenizer = Arc::new(tokenizer);
    let written =
        pool.install(|| write_splits(cfg, &files, tokenizer, &mask_vocab, &val_dir, input_bytes))?;
    let (train_shards, mut train_totals) = written.train;
    let (val_shards, val_totals) = written.validation;
    let stats = written.input_stats;

    train_totals.input_bytes = input_bytes;
    train_totals.invalid_utf8_lines_skipped = stats.invalid_utf8_lines;
    train_totals.long_lines_truncated = stats.long_lines_truncated;
    train_totals.malformed_records_skipped = stats.malformed_records;
    train_totals.long_documents_split = stats.long_documents_split;
    train_totals.empty_documents_skipped += stats.empty_documents;
    train_totals.validation_documents = val_totals.documents;
    if train_totals.instances + val_totals.instances == 0 {
        bail!(
            "the input ({}) produced no instances: it holds no document with text; check the format (one sentence per line, blank line between documents; JSONL or Parquet with a `text` field)",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let options = RecordedOptions {
        masked_lm_prob: cfg.options.masked_lm_prob,
        short_seq_prob: cfg.options.short_seq_prob,
        dupe_factor: cfg.options.dupe_factor,
        whole_word_mask: cfg.options.whole_word_mask,
        seed: cfg.options.seed,
        shard_rows: cfg.options.shard_rows,
        row_group_rows: cfg.options.row_group_rows,
        window_bytes: cfg.window_bytes,
        slice_tokens: cfg.slice_tokens,
        validation_fraction: cfg.options.validation_fraction,
        lowercase: vocab.casing.lowercase,
        casing: vocab.casing.to_string(),
    };
    let inputs: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let manifest =
        |dir: &Path, split: &str, shards: Vec<ShardEntry>, totals: Totals, vocab_file: &str| {
            Manifest::new(
                dir,
                split,
                shards,
                vocab.len(),
                vocab.sha256.clone(),
                cfg.options.max_seq_len,
                cfg.options.max_predictions,
                options.clone(),
                inputs.clone(),
                vocab_file.to_string(),
                totals,
            )
        };
    let validation = if cfg.options.validation_fraction > 0.0 {
        let m = manifest(
            &val_dir,
            "validation",
            val_shards,
            val_totals,
            "../vocab.txt",
        );
        m.write()?;
        Some(m)
    } else {
        None
    };
    let mut train = manifest(&cfg.output, "train", train_shards, train_totals, VOCAB_FILE);
    if validation.is_some() {
        train.set_validation_manifest(Some(format!("{VALIDATION_DIR}/{MANIFEST_FILE}")));
    }
    train.write()?;
    Ok(DataprepReport {
        train,
        validation,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What [`write_splits`] wrote: each split's shards and totals.
struct Written {
    train: (Vec<ShardEntry>, Totals),
    validation: (Vec<ShardEntry>, Totals),
    input_stats: InputStats,
}

/// Reads, tokenises, generates and writes both splits. Runs on the dataprep pool.
fn write_splits(
    cfg: &DataprepConfig,
    files: &[PathBuf],
    tokenizer: Arc<SentenceTokenizer>,
    mask_vocab: &MaskVocab,
    val_dir: &Path,
    input_bytes: u64,
) -> Result<Written> {
    let unk = tokenizer.unk();
    let mut windows = WindowReader::new(files.to_vec(), cfg.window_bytes, tokenizer);
    let mut writers = [
        ShardWriter::new(
            &cfg.output,
            cfg.options.shard_rows,
            cfg.options.row_group_rows,
        )?,
        ShardWriter::new(val_dir, cfg.options.shard_rows, cfg.options.row_group_rows)?,
    ];
    let mut progress = Progress::new(cfg.show_progress, input_bytes);
    let mut totals = [Totals::default(), Totals::default()];
    while let Some(w) = windows.next_window()? {
        let docs = split_window(w, cfg);
        totals[0].empty_documents_skipped += docs.empty;
        for (split, split_docs) in [&docs.train, &docs.validation].into_iter().enumerate() {
            add_document_totals(&mut totals[split], split_docs, unk);
            for (slice, units) in slices(split_docs, cfg.slice_tokens).into_iter().enumerate() {
                // Only one slice's instances at a time: the previous slice's last row groups
                // are encoded (by every thread) before the next slice is made. Letting them
                // overlap ran no faster and held two slices, the largest item of the peak.
                // The next window is still read while the last slice's groups encode.
                for writer in &mut writers {
                    writer.drain()?;
                }
                let key = [docs.index, split as u64, slice as u64];
                let out = generate_slice(split_docs, units, key, cfg, mask_vocab);
                add_instance_totals(&mut totals[split], &out.batches);
                let count = out.order.len();
                writers[split].write_rows(Arc::new(out), count)?;
            }
        }
        progress.update(
            windows.reader.bytes_read.load(Ordering::Relaxed),
            totals[0].documents + totals[1].documents,
            totals[0].instances + totals[1].instances,
        );
    }
    let [train_writer, val_writer] = writers;
    let [train_totals, val_totals] = totals;
    let train = (train_writer.finish()?, train_totals);
    let validation = (val_writer.finish()?, val_totals);
    progress.finish();
    Ok(Written {
        train,
        validation,
        input_stats: windows.reader.stats.clone(),
    })
}

fn add_document_totals(into: &mut Totals, docs: &[TokenizedDoc], unk: u32) {
    into.documents += docs.len() as u64;
    for d in docs {
        into.text_tokens += d.tokens.len() as u64;
        into.unk_tokens += d.tokens.iter().filter(|&&t| t == unk).count() as u64;
    }
    into.sentences += docs.iter().map(|d| d.sentences() as u64).sum::<u64>();
    into.single_sentence_documents += docs.iter().filter(|d| d.sentences() == 1).count() as u64;
}

fn add_instance_totals(into: &mut Totals, batches: &[InstanceBatch]) {
    for b in batches {
        into.instances += b.rows() as u64;
        into.tokens += b.tokens();
        into.masked_tokens += b.masked();
        into.not_next += b.not_next();
        into.is_next += b.rows() as u64 - b.not_next();
    }
}
