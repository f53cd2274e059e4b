//! The dataprep run: corpus stream -> windows -> tokenise + generate in parallel -> shards.
//!
//! Streaming and memory: documents are read in *windows* of about `window_bytes` of text
//! (default 4 MiB, ~1000 Wikipedia-sized documents). A window is tokenised, turned into
//! instances, shuffled and written before it is dropped; one window is being read, one
//! processed and one written at any time, so peak memory depends on the window size, not on
//! the corpus size.
//!
//! NotNext: the "random other document" is drawn uniformly from the other documents of the
//! same window (and of the same split: validation documents only pair with validation
//! documents), never the document itself. A trailing window with fewer than
//! [`MIN_WINDOW_DOCS`] documents is merged into the one before it, so no window is too small to
//! draw from. A split of a window with a single document yields IsNext pairs only.
//!
//! Determinism: within a window, work is cut into units of (duplication, run of
//! [`UNIT_DOCS`] documents), each with its own RNG seeded from (seed, window, split,
//! duplication, unit). Units are collected in order and the window's rows are shuffled with an
//! RNG seeded from (seed, window, split), then written in that order. Nothing depends on which
//! thread ran what, so the shards are byte-identical for any `--threads`.
//!
//! Validation: a document goes to the validation split when a hash of (seed, its index in the
//! corpus) falls below `validation_fraction`, so whole documents are held out and the choice
//! does not depend on windows or threads.

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::input::{DocumentReader, InputStats, expand_inputs};
use crate::instances::{
    GenOptions, InstanceBatch, MaskVocab, TokenizedDoc, instances_from_document,
};
use crate::manifest::{
    DataprepOptions, MANIFEST_FILE, Manifest, ShardEntry, Totals, write_file_atomically,
};
use crate::progress::Progress;
use crate::rng::{Rng, derive_seed};
use crate::shards::ShardWriter;
use crate::vocab::{TOKENIZER_CONFIG, Vocab, tokenizer_config_json};

/// Documents per unit of parallel work.
pub const UNIT_DOCS: usize = 8;
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
    pub max_seq_len: usize,
    pub max_predictions: usize,
    pub masked_lm_prob: f64,
    pub short_seq_prob: f64,
    pub dupe_factor: usize,
    pub whole_word_mask: bool,
    pub seed: u64,
    pub shard_rows: usize,
    pub row_group_rows: usize,
    pub threads: usize,
    pub validation_fraction: f64,
    pub window_bytes: usize,
    pub overwrite: bool,
    pub show_progress: bool,
}

impl DataprepConfig {
    /// The defaults for everything but the paths.
    pub fn new(inputs: Vec<PathBuf>, vocab: PathBuf, output: PathBuf) -> DataprepConfig {
        DataprepConfig {
            inputs,
            vocab,
            lowercase: None,
            output,
            max_seq_len: 128,
            max_predictions: 20,
            masked_lm_prob: 0.15,
            short_seq_prob: 0.1,
            dupe_factor: 5,
            whole_word_mask: false,
            seed: 12345,
            shard_rows: 100_000,
            row_group_rows: 4096,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            validation_fraction: 0.0,
            window_bytes: 4 << 20,
            overwrite: false,
            show_progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.max_seq_len < 8 {
            bail!(
                "--max-seq-len {} is too small; it must be at least 8",
                self.max_seq_len
            );
        }
        if self.max_seq_len > 1 << 20 {
            bail!("--max-seq-len {} is too large", self.max_seq_len);
        }
        if self.max_predictions == 0 {
            bail!("--max-predictions must be at least 1");
        }
        if !(self.masked_lm_prob > 0.0 && self.masked_lm_prob <= 1.0) {
            bail!("--masked-lm-prob {} must be in (0, 1]", self.masked_lm_prob);
        }
        if !(0.0..=1.0).contains(&self.short_seq_prob) {
            bail!("--short-seq-prob {} must be in [0, 1]", self.short_seq_prob);
        }
        if self.dupe_factor == 0 {
            bail!("--dupe-factor must be at least 1");
        }
        if self.shard_rows == 0 || self.row_group_rows == 0 {
            bail!("--shard-rows and --row-group-rows must be at least 1");
        }
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            bail!(
                "--validation-fraction {} must be in [0, 1)",
                self.validation_fraction
            );
        }
        if self.window_bytes == 0 {
            bail!("--window-mb must be positive");
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

struct Window {
    index: u64,
    first_doc: u64,
    docs: Vec<Vec<String>>,
}

enum ReaderMsg {
    Window(Window),
    Done(InputStats),
}

#[derive(Default)]
struct SplitOutput {
    batches: Vec<InstanceBatch>,
    order: Vec<(u32, u32)>,
    totals: Totals,
}

struct WindowOutput {
    train: SplitOutput,
    validation: SplitOutput,
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
    let tokenizer = vocab.tokenizer()?;
    let mask_vocab = MaskVocab::from_vocab(&vocab);
    // Read before the output is prepared: the vocab may be the old dataset's own copy.
    let vocab_bytes = fs::read(&vocab.path)
        .with_context(|| format!("reading vocabulary {}", vocab.path.display()))?;
    prepare_output(&cfg.output, cfg.overwrite)?;
    let val_dir = cfg.output.join(VALIDATION_DIR);
    if cfg.validation_fraction > 0.0 {
        fs::create_dir_all(&val_dir).with_context(|| format!("creating {}", val_dir.display()))?;
    }
    copy_vocab(&vocab, &vocab_bytes, &cfg.output)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .thread_name(|i| format!("dataprep-{i}"))
        .build()
        .context("starting worker threads")?;
    let gen_opts = GenOptions {
        max_seq_len: cfg.max_seq_len,
        max_predictions: cfg.max_predictions,
        masked_lm_prob: cfg.masked_lm_prob,
        short_seq_prob: cfg.short_seq_prob,
        whole_word_mask: cfg.whole_word_mask,
    };

    let mut reader = DocumentReader::new(files.clone(), cfg.window_bytes);
    let bytes_read = reader.bytes_read.clone();
    let (doc_tx, doc_rx) = sync_channel::<Result<ReaderMsg>>(1);
    let window_bytes = cfg.window_bytes;
    let reader_thread = std::thread::Builder::new()
        .name("dataprep-read".into())
        .spawn(move || read_windows(&mut reader, window_bytes, &doc_tx))
        .context("starting the reader thread")?;

    let (out_tx, out_rx) = sync_channel::<WindowOutput>(1);
    let train_writer = ShardWriter::new(&cfg.output, cfg.shard_rows, cfg.row_group_rows);
    let val_writer = ShardWriter::new(&val_dir, cfg.shard_rows, cfg.row_group_rows);
    let writer_thread = std::thread::Builder::new()
        .name("dataprep-write".into())
        .spawn(move || write_windows(out_rx, train_writer, val_writer))
        .context("starting the writer thread")?;

    let mut progress = Progress::new(cfg.show_progress, input_bytes);
    let mut train_totals = Totals::default();
    let mut val_totals = Totals::default();
    let mut input_stats = None;
    let processed: Result<()> = (|| {
        for msg in doc_rx.iter() {
            match msg? {
                ReaderMsg::Window(w) => {
                    let out = pool
                        .install(|| process_window(&w, cfg, &tokenizer, &gen_opts, &mask_vocab))?;
                    add_totals(&mut train_totals, &out.train.totals);
                    add_totals(&mut val_totals, &out.validation.totals);
                    progress.update(
                        bytes_read.load(Ordering::Relaxed),
                        train_totals.documents + val_totals.documents,
                        train_totals.instances + val_totals.instances,
                    );
                    if out_tx.send(out).is_err() {
                        // The writer stopped; its error is reported below.
                        break;
                    }
                }
                ReaderMsg::Done(stats) => input_stats = Some(stats),
            }
        }
        Ok(())
    })();
    drop(out_tx);
    drop(doc_rx);
    let written = writer_thread
        .join()
        .map_err(|_| anyhow!("the shard writer thread panicked"))?;
    let read = reader_thread
        .join()
        .map_err(|_| anyhow!("the reader thread panicked"))?;
    processed?;
    read?;
    let (train_shards, val_shards) = written?;
    progress.finish();
    let stats = input_stats.ok_or_else(|| anyhow!("the corpus reader stopped early"))?;

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

    let options = DataprepOptions {
        masked_lm_prob: cfg.masked_lm_prob,
        short_seq_prob: cfg.short_seq_prob,
        dupe_factor: cfg.dupe_factor,
        whole_word_mask: cfg.whole_word_mask,
        seed: cfg.seed,
        shard_rows: cfg.shard_rows,
        row_group_rows: cfg.row_group_rows,
        window_bytes: cfg.window_bytes,
        validation_fraction: cfg.validation_fraction,
        lowercase: vocab.lowercase,
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
                cfg.max_seq_len,
                cfg.max_predictions,
                options.clone(),
                inputs.clone(),
                vocab_file.to_string(),
                totals,
            )
        };
    let validation = if cfg.validation_fraction > 0.0 {
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
    let mut train = manifest(
        &cfg.output,
        "train",
        train_shards,
        train_totals,
        "vocab.txt",
    );
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

fn add_totals(into: &mut Totals, t: &Totals) {
    into.documents += t.documents;
    into.sentences += t.sentences;
    into.instances += t.instances;
    into.tokens += t.tokens;
    into.masked_tokens += t.masked_tokens;
    into.is_next += t.is_next;
    into.not_next += t.not_next;
    into.empty_documents_skipped += t.empty_documents_skipped;
    into.single_sentence_documents += t.single_sentence_documents;
}

fn read_windows(
    reader: &mut DocumentReader,
    window_bytes: usize,
    tx: &SyncSender<Result<ReaderMsg>>,
) -> Result<()> {
    let result = (|| -> Result<()> {
        let mut pieces = VecDeque::new();
        let mut held: Option<Window> = None;
        let mut current = Window {
            index: 0,
            first_doc: 0,
            docs: Vec::new(),
        };
        let mut current_bytes = 0usize;
        let mut next_doc = 0u64;
        let mut next_index = 0u64;
        let send = |w: Window| tx.send(Ok(ReaderMsg::Window(w))).is_ok();
        while let Some(doc) = reader.next_document(&mut pieces)? {
            if current.docs.is_empty() {
                current.first_doc = next_doc;
            }
            current_bytes += doc.iter().map(|s| s.len()).sum::<usize>();
            current.docs.push(doc);
            next_doc += 1;
            if current_bytes >= window_bytes {
                current.index = next_index;
                next_index += 1;
                let full = std::mem::replace(
                    &mut current,
                    Window {
                        index: 0,
                        first_doc: next_doc,
                        docs: Vec::new(),
                    },
                );
                current_bytes = 0;
                // Hold one full window back so a small trailing window can join it.
                if let Some(prev) = held.replace(full) {
                    if !send(prev) {
                        return Ok(());
                    }
                }
            }
        }
        match held {
            Some(mut prev) if current.docs.len() < MIN_WINDOW_DOCS => {
                prev.docs.append(&mut current.docs);
                send(prev);
            }
            Some(prev) => {
                if send(prev) {
                    current.index = next_index;
                    if !current.docs.is_empty() {
                        send(current);
                    }
                }
            }
            None => {
                current.index = next_index;
                if !current.docs.is_empty() {
                    send(current);
                }
            }
        }
        let _ = tx.send(Ok(ReaderMsg::Done(reader.stats.clone())));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = tx.send(Err(e));
    }
    Ok(())
}

fn is_validation(seed: u64, doc: u64, fraction: f64) -> bool {
    fraction > 0.0
        && ((derive_seed(&[seed, doc, SALT_VALIDATION]) >> 11) as f64 / (1u64 << 53) as f64)
            < fraction
}

fn tokenize_document(tokenizer: &Tokenizer, sentences: &[String]) -> Result<TokenizedDoc> {
    let mut doc = TokenizedDoc::default();
    for s in sentences {
        let enc = tokenizer
            .encode_fast(s.as_str(), false)
            .map_err(|e| anyhow!("tokenising a sentence: {e}"))?;
        doc.push_sentence(enc.get_ids());
    }
    Ok(doc)
}

fn process_window(
    w: &Window,
    cfg: &DataprepConfig,
    tokenizer: &Tokenizer,
    gen_opts: &GenOptions,
    vocab: &MaskVocab,
) -> Result<WindowOutput> {
    let tokenized: Vec<TokenizedDoc> = w
        .docs
        .par_iter()
        .map(|d| tokenize_document(tokenizer, d))
        .collect::<Result<_>>()?;
    let mut train = Vec::new();
    let mut validation = Vec::new();
    let mut empty = 0u64;
    for (i, doc) in tokenized.into_iter().enumerate() {
        if doc.sentences() == 0 {
            empty += 1;
            continue;
        }
        if is_validation(cfg.seed, w.first_doc + i as u64, cfg.validation_fraction) {
            validation.push(doc);
        } else {
            train.push(doc);
        }
    }
    let mut out = WindowOutput {
        train: generate_split(&train, w.index, 0, cfg, gen_opts, vocab),
        validation: generate_split(&validation, w.index, 1, cfg, gen_opts, vocab),
    };
    out.train.totals.empty_documents_skipped = empty;
    Ok(out)
}

fn generate_split(
    docs: &[TokenizedDoc],
    window: u64,
    split: u64,
    cfg: &DataprepConfig,
    gen_opts: &GenOptions,
    vocab: &MaskVocab,
) -> SplitOutput {
    if docs.is_empty() {
        return SplitOutput::default();
    }
    let units_per_dupe = docs.len().div_ceil(UNIT_DOCS);
    let batches: Vec<InstanceBatch> = (0..cfg.dupe_factor * units_per_dupe)
        .into_par_iter()
        .map(|u| {
            let (dupe, unit) = (u / units_per_dupe, u % units_per_dupe);
            let mut rng =
                Rng::from_parts(&[cfg.seed, SALT_UNIT, window, split, dupe as u64, unit as u64]);
            let mut batch = InstanceBatch::new();
            let first = unit * UNIT_DOCS;
            for d in first..(first + UNIT_DOCS).min(docs.len()) {
                instances_from_document(docs, d, gen_opts, vocab, &mut rng, &mut batch);
            }
            batch
        })
        .collect();
    let mut order: Vec<(u32, u32)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.rows() as u32).map(move |r| (b as u32, r)))
        .collect();
    Rng::from_parts(&[cfg.seed, SALT_SHUFFLE, window, split]).shuffle(&mut order);
    let mut totals = Totals {
        documents: docs.len() as u64,
        sentences: docs.iter().map(|d| d.sentences() as u64).sum(),
        single_sentence_documents: docs.iter().filter(|d| d.sentences() == 1).count() as u64,
        ..Totals::default()
    };
    for b in &batches {
        totals.instances += b.rows() as u64;
        totals.tokens += b.tokens();
        totals.masked_tokens += b.masked();
        totals.not_next += b.not_next();
    }
    totals.is_next = totals.instances - totals.not_next;
    SplitOutput {
        batches,
        order,
        totals,
    }
}

fn write_windows(
    rx: Receiver<WindowOutput>,
    mut train: ShardWriter,
    mut validation: ShardWriter,
) -> Result<(Vec<ShardEntry>, Vec<ShardEntry>)> {
    for w in rx.iter() {
        for (split, writer) in [(&w.train, &mut train), (&w.validation, &mut validation)] {
            for &(b, r) in &split.order {
                let (ids, a_len, pos, masked, label) = split.batches[b as usize].row(r as usize);
                writer.push(ids, a_len as usize, pos, masked, label)?;
            }
        }
    }
    Ok((train.finish()?, validation.finish()?))
}

/// Makes `dir` ready for a new dataset. An existing dataset (or the leftovers of a run that
/// crashed) is removed only with `overwrite`, manifest first, so no manifest ever names a
/// deleted shard. A directory holding anything dataprep did not write is never touched.
fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
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
    crate::manifest::sync_dir(dir);
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
fn dataset_entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
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

fn is_dataset_file(name: &str) -> bool {
    name == MANIFEST_FILE
        || name == "vocab.txt"
        || name == TOKENIZER_CONFIG
        || (name.starts_with("shard-") && name.ends_with(".parquet"))
        || (name.starts_with('.') && name.ends_with(".tmp"))
}

/// Copies the vocabulary (and its lowercasing) into the dataset so it is self-contained.
fn copy_vocab(vocab: &Vocab, bytes: &[u8], dir: &Path) -> Result<()> {
    write_file_atomically(&dir.join("vocab.txt"), bytes)?;
    write_file_atomically(
        &dir.join(TOKENIZER_CONFIG),
        tokenizer_config_json(vocab.lowercase).as_bytes(),
    )
}
