//! Command-line arguments of the dataprep subcommands and their entry points.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::input::{DocumentReader, expand_inputs};
use bertrain_files::{temp_name, write_atomically};

use crate::manifest::Totals;
use crate::options::DataprepOptions;
use crate::pipeline::{DEFAULT_WINDOW_MB, DataprepConfig, DataprepReport};
use crate::synth::{DEFAULT_SYNTH_DOCS, SynthOptions, synth_corpus_with};
use crate::vocab::{Casing, CasingSource, train_vocab};
use bertrain_files::TOKENIZER_CONFIG_FILE;

/// Train a WordPiece vocabulary (HF BERT layout: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
/// [MASK]=103) and write vocab.txt plus tokenizer_config.json beside it.
#[derive(Args, Debug, Clone)]
pub struct VocabArgs {
    /// Corpus files, directories or glob patterns (text, .jsonl, .parquet; .gz/.zst).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Largest vocabulary size; a small corpus may support fewer entries.
    #[arg(long, default_value_t = 30522)]
    pub vocab_size: usize,
    /// Lowercase and strip accents (the default).
    #[arg(long, conflicts_with = "cased")]
    pub lowercase: bool,
    /// Keep case and accents.
    #[arg(long)]
    pub cased: bool,
    /// Where to write vocab.txt (tokenizer_config.json goes into the same directory).
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing vocab file.
    #[arg(long)]
    pub overwrite: bool,
}

/// Turn a corpus into Parquet shards of MLM + NSP instances with a manifest.
#[derive(Args, Debug, Clone)]
pub struct DataprepArgs {
    /// Corpus files, directories or glob patterns (text, .jsonl, .parquet; .gz/.zst).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// WordPiece vocab.txt (from `bertrain vocab` or any HF BERT model).
    #[arg(long)]
    pub vocab: PathBuf,
    /// Output dataset directory.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub options: DataprepOptions,
    /// Threads that do all the work: read, tokenise, generate, encode and append (default:
    /// all cores). The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Text per window in MiB: the unit processed at once, and the pool NotNext draws
    /// its random document from. Bounds memory.
    #[arg(long, default_value_t = DEFAULT_WINDOW_MB)]
    pub window_mb: usize,
    /// Force lowercasing (must agree with a tokenizer_config.json beside the vocab).
    #[arg(long, conflicts_with = "cased")]
    pub lowercase: bool,
    /// Force case-preserving tokenisation.
    #[arg(long)]
    pub cased: bool,
    /// Replace a dataset already in the output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// Decode a few instances and print shard and dataset statistics.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A dataset directory, its manifest.json, or one shard .parquet file.
    pub path: PathBuf,
    /// Number of instances to decode.
    #[arg(long, default_value_t = 3)]
    pub rows: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Vocabulary to decode with (default: the dataset's own vocab.txt).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
}

/// Write the project's synthetic English-like corpus (BERT text format).
#[derive(Args, Debug, Clone)]
pub struct SynthCorpusArgs {
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = DEFAULT_SYNTH_DOCS)]
    pub docs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fewest sentences per document.
    #[arg(long, default_value_t = 4)]
    pub min_sentences: usize,
    /// Most sentences per document.
    #[arg(long, default_value_t = 16)]
    pub max_sentences: usize,
    /// Replace an existing file.
    #[arg(long)]
    pub overwrite: bool,
}

fn flag(lowercase: bool, cased: bool) -> Option<bool> {
    match (lowercase, cased) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

pub fn run_vocab(args: VocabArgs) -> Result<()> {
    let files = expand_inputs(&args.input)?;
    let config = args.output.with_file_name(TOKENIZER_CONFIG_FILE);
    for p in [&args.output, &config] {
        if p.exists() && !args.overwrite {
            bail!(
                "{} already exists; pass --overwrite to replace it or choose another --output",
                p.display()
            );
        }
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let lowercase = flag(args.lowercase, args.cased).unwrap_or(true);
    let mut reader = DocumentReader::new(files, 64 << 20);
    let error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let err_slot = error.clone();
    let docs = std::iter::from_fn(move || {
        let mut pending = std::collections::VecDeque::new();
        match reader.next_document(&mut pending) {
            Ok(Some(d)) => Some(d.join("\n")),
            Ok(None) => None,
            Err(e) => {
                if let Ok(mut slot) = err_slot.lock() {
                    *slot = Some(e);
                }
                None
            }
        }
    });
    let tokens = train_vocab(docs, args.vocab_size, lowercase)?;
    if let Some(e) = error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    let mut text = tokens.join("\n");
    text.push('\n');
    write_atomically(&args.output, text.as_bytes())?;
    let casing = Casing {
        lowercase,
        source: CasingSource::Trained,
    };
    write_atomically(&config, casing.tokenizer_config_json().as_bytes())?;
    println!(
        "wrote {} ({} tokens{}; {}) and {}",
        args.output.display(),
        tokens.len(),
        if tokens.len() < args.vocab_size {
            format!(
                ", fewer than the {} asked for: the corpus supports no more",
                args.vocab_size
            )
        } else {
            String::new()
        },
        if lowercase { "lowercase" } else { "cased" },
        config.display()
    );
    Ok(())
}

impl DataprepArgs {
    pub fn to_config(&self) -> DataprepConfig {
        let mut c =
            DataprepConfig::new(self.input.clone(), self.vocab.clone(), self.output.clone());
        c.lowercase = flag(self.lowercase, self.cased);
        c.options = self.options.clone();
        if let Some(t) = self.threads {
            c.threads = t;
        }
        c.window_bytes = self.window_mb.saturating_mul(1 << 20);
        c.overwrite = self.overwrite;
        c.show_progress = !self.quiet;
        c
    }
}

pub fn run_dataprep(args: DataprepArgs) -> Result<()> {
    let report = crate::pipeline::run(&args.to_config())?;
    print_summary(&report);
    Ok(())
}

fn print_summary(r: &DataprepReport) {
    let t = &r.train.totals;
    let v = r.validation.as_ref().map(|m| &m.totals);
    let mb = t.input_bytes as f64 / 1e6;
    println!(
        "dataprep done in {:.2} s ({:.1} MB/s of input)",
        r.seconds,
        mb / r.seconds.max(1e-9)
    );
    let row = |name: &str, f: &dyn Fn(&Totals) -> u64| {
        let val = v.map(|v| f(v).to_string()).unwrap_or_else(|| "-".into());
        println!("  {name:<28} {:>14} {:>14}", f(t), val);
    };
    println!("  {:<28} {:>14} {:>14}", "", "train", "validation");
    row("documents", &|t| t.documents);
    row("sentences", &|t| t.sentences);
    row("instances", &|t| t.instances);
    row("  IsNext", &|t| t.is_next);
    row("  NotNext", &|t| t.not_next);
    row("tokens", &|t| t.tokens);
    row("masked tokens", &|t| t.masked_tokens);
    row("single-sentence documents", &|t| {
        t.single_sentence_documents
    });
    let share = |t: &Totals| format!("{:.3}%", 100.0 * t.unk_share());
    println!(
        "  {:<28} {:>14} {:>14}",
        "[UNK] share of the text",
        share(t),
        v.map(share).unwrap_or_else(|| "-".into())
    );
    println!(
        "  {:<28} {:>14} {:>14}",
        "shard files",
        r.train.shards.len(),
        r.validation
            .as_ref()
            .map(|m| m.shards.len().to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("  skipped or repaired input:");
    println!(
        "    empty documents            {:>14}",
        t.empty_documents_skipped
    );
    println!(
        "    invalid UTF-8 lines        {:>14}",
        t.invalid_utf8_lines_skipped
    );
    println!(
        "    long lines truncated       {:>14}",
        t.long_lines_truncated
    );
    println!(
        "    malformed records          {:>14}",
        t.malformed_records_skipped
    );
    println!(
        "    long documents split       {:>14}",
        t.long_documents_split
    );
    println!("  input        {:.2} MB", mb);
    println!("  output       {}", r.train.dir().display());
    println!("  content hash {}", r.train.content_hash());
    println!("  casing       {}", r.train.options.casing);
    if let Some(warning) = r.unk_warning() {
        tracing::warn!("{warning}");
    }
    if let Some(vm) = &r.validation
        && vm.totals.instances == 0
    {
        println!(
            "  warning: --validation-fraction selected no documents; the validation split is empty"
        );
    }
}

pub fn run_inspect(args: InspectArgs) -> Result<()> {
    crate::inspect::run(&args.path, args.rows, args.json, args.vocab.as_deref())
}

pub fn run_synth_corpus(args: SynthCorpusArgs) -> Result<()> {
    if args.output.exists() && !args.overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it or choose another --output",
            args.output.display()
        );
    }
    if args.min_sentences == 0 || args.max_sentences < args.min_sentences {
        bail!(
            "--min-sentences {} / --max-sentences {}: need 1 <= min <= max",
            args.min_sentences,
            args.max_sentences
        );
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = temp_name(&args.output);
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::new(file);
    let mut bytes = 0usize;
    let options = SynthOptions {
        docs: args.docs,
        seed: args.seed,
        min_sentences: args.min_sentences,
        max_sentences: args.max_sentences,
    };
    for (i, doc) in synth_corpus_with(options).enumerate() {
        if i > 0 {
            w.write_all(b"\n")?;
        }
        w.write_all(doc.as_bytes())?;
        w.write_all(b"\n")?;
        bytes += doc.len() + 2;
    }
    let file = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", tmp.display(), e.error()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, &args.output)
        .with_context(|| format!("renaming {} to {}", tmp.display(), args.output.display()))?;
    println!(
        "wrote {} ({} documents, {:.2} MB)",
        args.output.display(),
        args.docs,
        bytes as f64 / 1e6
    );
    Ok(())
}
