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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_files::write_atomically;
use rayon::prelude::*;

use crate::input::{DocumentReader, InputStats, expand_inputs};
use crate::instances::{
    GenOptions, InstanceBatch, MaskVocab, TokenizedDoc, instances_from_document,
};
use crate::manifest::{DataprepOptions, MANIFEST_FILE, Manifest, ShardEntry, Totals};
use crate::progress::Progress;
use crate::rng::{Rng, derive_seed};
use crate::shards::{RowRef, RowSource, ShardWriter};
use crate::tasks::InOrder;
use crate::vocab::{TOKENIZER_CONFIG, Vocab};
use crate::wordpiece::SentenceTokenizer;

/// Documents per unit of parallel work.
pub const UNIT_DOCS: usize = 8;
/// Default tokens of the documents a slice of instances is made from (about 1 MiB of text).
/// A slice's instances (five times its tokens) stay alive until its last row group is
/// encoded, so this sets most of the peak.
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
    /// Tokens of the documents each slice of instances is made from (see the module docs).
    pub slice_tokens: usize,
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
            row_group_rows: 1024,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            validation_fraction: 0.0,
            window_bytes: 4 << 20,
            slice_tokens: SLICE_TOKENS,
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

/// A window's documents, tokenised, in corpus order.
struct Window {
    index: u64,
    first_doc: u64,
    docs: Vec<TokenizedDoc>,
}

/// A document's sentences in one buffer: one allocation per document rather than one per
/// sentence, while it waits to be tokenised.
struct RawDoc {
    text: String,
    ends: Vec<u32>,
}

impl RawDoc {
    fn new(sentences: Vec<String>) -> RawDoc {
        let mut text = String::with_capacity(sentences.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(sentences.len());
        for s in &sentences {
            text.push_str(s);
            ends.push(text.len() as u32);
        }
        RawDoc { text, ends }
    }

    fn sentences(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&e| e as usize));
        starts
            .zip(self.ends.iter())
            .map(|(start, &end)| &self.text[start..end as usize])
    }
}

/// A window's documents, tokenised and split.
struct WindowDocs {
    index: u64,
    train: Vec<TokenizedDoc>,
    validation: Vec<TokenizedDoc>,
    empty: u64,
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

    // The whole loop runs on the pool, reading and appending included, so `--threads` is the
    // number of threads at work: with one, everything happens on that thread.
    let tokenizer = Arc::new(tokenizer);
    let written = pool.install(|| {
        write_splits(
            cfg,
            &files,
            tokenizer,
            &gen_opts,
            &mask_vocab,
            &val_dir,
            input_bytes,
        )
    })?;
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

    let options = DataprepOptions {
        masked_lm_prob: cfg.masked_lm_prob,
        short_seq_prob: cfg.short_seq_prob,
        dupe_factor: cfg.dupe_factor,
        whole_word_mask: cfg.whole_word_mask,
        seed: cfg.seed,
        shard_rows: cfg.shard_rows,
        row_group_rows: cfg.row_group_rows,
        window_bytes: cfg.window_bytes,
        slice_tokens: cfg.slice_tokens,
        validation_fraction: cfg.validation_fraction,
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
    gen_opts: &GenOptions,
    mask_vocab: &MaskVocab,
    val_dir: &Path,
    input_bytes: u64,
) -> Result<Written> {
    let unk = tokenizer.unk();
    let mut windows = WindowReader::new(files.to_vec(), cfg.window_bytes, tokenizer);
    let mut writers = [
        ShardWriter::new(&cfg.output, cfg.shard_rows, cfg.row_group_rows)?,
        ShardWriter::new(val_dir, cfg.shard_rows, cfg.row_group_rows)?,
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
                let out = generate_slice(split_docs, units, key, cfg, gen_opts, mask_vocab);
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

/// Cuts the document stream into windows, tokenised as they are read.
struct WindowReader {
    reader: DocumentReader,
    tokenizer: Arc<SentenceTokenizer>,
    window_bytes: usize,
    pieces: VecDeque<Vec<String>>,
    /// Documents read past the end of the last window, so that a tail too small to draw
    /// NotNext partners from can join that window instead of forming its own.
    ahead: VecDeque<RawDoc>,
    ended: bool,
    index: u64,
    first_doc: u64,
}

impl WindowReader {
    fn new(
        files: Vec<PathBuf>,
        window_bytes: usize,
        tokenizer: Arc<SentenceTokenizer>,
    ) -> WindowReader {
        WindowReader {
            reader: DocumentReader::new(files, window_bytes),
            tokenizer,
            window_bytes,
            pieces: VecDeque::new(),
            ahead: VecDeque::new(),
            ended: false,
            index: 0,
            first_doc: 0,
        }
    }

    fn read_document(&mut self) -> Result<Option<RawDoc>> {
        let doc = self.reader.next_document(&mut self.pieces)?;
        self.ended = doc.is_none();
        Ok(doc.map(RawDoc::new))
    }

    fn next_window(&mut self) -> Result<Option<Window>> {
        let mut docs = TokenizingDocs::new(Arc::clone(&self.tokenizer));
        let mut bytes = 0;
        while bytes < self.window_bytes {
            let doc = match self.ahead.pop_front() {
                Some(d) => d,
                None if self.ended => break,
                None => match self.read_document()? {
                    Some(d) => d,
                    None => break,
                },
            };
            bytes += doc.text.len();
            docs.push(doc)?;
        }
        while !self.ended && self.ahead.len() < MIN_WINDOW_DOCS {
            if let Some(d) = self.read_document()? {
                self.ahead.push_back(d);
            }
        }
        if self.ended && self.ahead.len() < MIN_WINDOW_DOCS {
            while let Some(d) = self.ahead.pop_front() {
                docs.push(d)?;
            }
        }
        let docs = docs.finish()?;
        if docs.is_empty() {
            return Ok(None);
        }
        let window = Window {
            index: self.index,
            first_doc: self.first_doc,
            docs,
        };
        self.index += 1;
        self.first_doc += window.docs.len() as u64;
        Ok(Some(window))
    }
}

/// Text per batch of documents handed to the pool to tokenise.
const TOKENIZE_BATCH_BYTES: usize = 64 << 10;

/// Tokenises documents on the pool while the reader goes on reading. Raw text is held only
/// for the batches still pending (at most [`crate::tasks::max_pending`]), not for a whole
/// window.
struct TokenizingDocs {
    tokenizer: Arc<SentenceTokenizer>,
    batch: Vec<RawDoc>,
    batch_bytes: usize,
    pending: InOrder<Vec<TokenizedDoc>>,
    done: Vec<TokenizedDoc>,
}

impl TokenizingDocs {
    fn new(tokenizer: Arc<SentenceTokenizer>) -> TokenizingDocs {
        TokenizingDocs {
            tokenizer,
            batch: Vec::new(),
            batch_bytes: 0,
            pending: InOrder::new(),
            done: Vec::new(),
        }
    }

    fn push(&mut self, doc: RawDoc) -> Result<()> {
        self.batch_bytes += doc.text.len();
        self.batch.push(doc);
        if self.batch_bytes >= TOKENIZE_BATCH_BYTES {
            self.send_batch()?;
        }
        Ok(())
    }

    fn send_batch(&mut self) -> Result<()> {
        while let Some(docs) = self.pending.make_room()? {
            self.done.extend(docs);
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let tokenizer = Arc::clone(&self.tokenizer);
        self.pending.spawn(move || {
            batch
                .iter()
                .map(|d| tokenize_document(&tokenizer, d))
                .collect()
        });
        Ok(())
    }

    /// The documents pushed, tokenised, in order.
    fn finish(mut self) -> Result<Vec<TokenizedDoc>> {
        if !self.batch.is_empty() {
            self.send_batch()?;
        }
        while let Some(docs) = self.pending.oldest()? {
            self.done.extend(docs);
        }
        Ok(self.done)
    }
}

fn is_validation(seed: u64, doc: u64, fraction: f64) -> bool {
    fraction > 0.0
        && ((derive_seed(&[seed, doc, SALT_VALIDATION]) >> 11) as f64 / (1u64 << 53) as f64)
            < fraction
}

fn tokenize_document(tokenizer: &SentenceTokenizer, raw: &RawDoc) -> Result<TokenizedDoc> {
    let mut doc = TokenizedDoc::default();
    let mut ids = Vec::with_capacity(64);
    for s in raw.sentences() {
        ids.clear();
        tokenizer.encode(s, &mut ids)?;
        doc.push_sentence(&ids);
    }
    Ok(doc)
}

/// Splits a window's documents into training and validation, dropping empty ones.
fn split_window(w: Window, cfg: &DataprepConfig) -> WindowDocs {
    let mut out = WindowDocs {
        index: w.index,
        train: Vec::new(),
        validation: Vec::new(),
        empty: 0,
    };
    for (i, doc) in w.docs.into_iter().enumerate() {
        if doc.sentences() == 0 {
            out.empty += 1;
        } else if is_validation(cfg.seed, w.first_doc + i as u64, cfg.validation_fraction) {
            out.validation.push(doc);
        } else {
            out.train.push(doc);
        }
    }
    out
}

/// Cuts a split's units (runs of [`UNIT_DOCS`] documents) into slices of about
/// `slice_tokens` tokens.
fn slices(docs: &[TokenizedDoc], slice_tokens: usize) -> Vec<Range<usize>> {
    let units = docs.len().div_ceil(UNIT_DOCS);
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for u in 0..units {
        let end_doc = ((u + 1) * UNIT_DOCS).min(docs.len());
        tokens += docs[u * UNIT_DOCS..end_doc]
            .iter()
            .map(|d| d.tokens.len())
            .sum::<usize>();
        if tokens >= slice_tokens || u + 1 == units {
            out.push(start..u + 1);
            (start, tokens) = (u + 1, 0);
        }
    }
    out
}

/// Instances of the documents of `units`, every duplication, in write order. `key` is
/// (window, split, slice). NotNext partners come from all of `docs`.
fn generate_slice(
    docs: &[TokenizedDoc],
    units: Range<usize>,
    [window, split, slice]: [u64; 3],
    cfg: &DataprepConfig,
    gen_opts: &GenOptions,
    vocab: &MaskVocab,
) -> SliceOutput {
    let per_dupe = units.len();
    let batches: Vec<InstanceBatch> = (0..cfg.dupe_factor * per_dupe)
        .into_par_iter()
        .map(|i| {
            let (dupe, unit) = (i / per_dupe, units.start + i % per_dupe);
            let mut rng =
                Rng::from_parts(&[cfg.seed, SALT_UNIT, window, split, dupe as u64, unit as u64]);
            GROWING_BATCH.with_borrow_mut(|batch| {
                batch.clear();
                let first = unit * UNIT_DOCS;
                for d in first..(first + UNIT_DOCS).min(docs.len()) {
                    instances_from_document(docs, d, gen_opts, vocab, &mut rng, batch);
                }
                // A copy with exactly the room it needs, one block per column.
                batch.clone()
            })
        })
        .collect();
    let mut order: Vec<(u32, u32)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.rows() as u32).map(move |r| (b as u32, r)))
        .collect();
    Rng::from_parts(&[cfg.seed, SALT_SHUFFLE, window, split, slice]).shuffle(&mut order);
    SliceOutput { batches, order }
}

thread_local! {
    /// Each thread grows a unit's instances here, then hands on an exact-size copy. Growing
    /// every unit's own columns by doubling (and shrinking them after) left each glibc arena
    /// holding the freed intermediate sizes, in holes that later slices did not fit: with two
    /// threads the 10x corpus peaked 1.3x as high as the 1x corpus, against 1.15x this way.
    static GROWING_BATCH: RefCell<InstanceBatch> = RefCell::new(InstanceBatch::new());
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
    write_atomically(&dir.join("vocab.txt"), bytes)?;
    write_atomically(
        &dir.join(TOKENIZER_CONFIG),
        vocab.casing.tokenizer_config_json().as_bytes(),
    )
}
