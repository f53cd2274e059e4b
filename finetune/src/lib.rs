//! `bertrain finetune`: sequence classification (one sentence or a pair) and regression
//! from a pretrained BERT, as HF's `BertForSequenceClassification`, trained with AdamW,
//! warmup and linear decay (BERT's fine-tuning recipe), with GLUE's validation metrics.
//!
//! - [`input`]: reading TSV (GLUE's files as distributed), CSV, JSON Lines, Parquet; labels.
//! - [`glue`]: GLUE's tasks, so that a task name sets columns, header and metric.
//! - [`data`]: tokenisation with the model's vocabulary and casing, batches.
//! - [`metrics`]: accuracy, F1, Matthews correlation, Pearson, Spearman.
//! - [`train`]: the training loop on any backend, evaluation, `metrics.jsonl`, the output.
//!
//! Everything a user can get wrong is checked before the output directory is created.

mod data;
mod glue;
mod input;
pub mod metrics;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bertrain_coordinator::job::{Backend, Precision};
use bertrain_model::hf::{self, CONFIG_FILE, VOCAB_FILE};
use bertrain_model::{BertConfig, BertForSequenceClassification, ParamLayout};
use bertrain_worker::{DeviceChoice, with_backend};

use crate::input::{Columns, LabelSpace};
pub use crate::metrics::Metric;
pub use crate::train::Summary;

/// Whether an example is one text or a pair (`[CLS] A [SEP] B [SEP]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskKind {
    Single,
    Pair,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// The pretrained model: an HF directory (config.json, model.safetensors, vocab.txt),
    /// a bertrain checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// Training examples: .tsv (GLUE's files as distributed), .csv, .jsonl or .parquet.
    #[arg(long)]
    pub train: PathBuf,
    /// Validation examples, in the same columns.
    #[arg(long)]
    pub validation: PathBuf,
    /// One text per example, or a pair. Default: from the number of --text-columns.
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// Number of classes; labels are then integers 0..N. Default: inferred from the
    /// training file (the largest integer label + 1, or the distinct named labels).
    #[arg(long, conflicts_with = "regression")]
    pub num_labels: Option<usize>,
    /// A numeric target (one output, mean squared error), e.g. STS-B.
    #[arg(long)]
    pub regression: bool,
    /// The text column(s), one or two, comma-separated. Default: the GLUE task's, else
    /// `sentence` (single) or `sentence1,sentence2` (pair). In a file without a header,
    /// columns are numbered from 0.
    #[arg(long, value_delimiter = ',')]
    pub text_columns: Vec<String>,
    /// The label column. Default: the GLUE task's, else `label`.
    #[arg(long)]
    pub label_column: Option<String>,
    /// TSV/CSV files without a header line (columns are then named 0, 1, ...).
    #[arg(long)]
    pub no_header: bool,
    /// A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): its columns,
    /// header and metric. Inferred from the directory of --train when that is GLUE's
    /// (`glue_data/SST-2/train.tsv`).
    #[arg(long)]
    pub glue_task: Option<String>,
    /// The metric the final line reports. Default: the GLUE task's, else accuracy
    /// (pearson for --regression). All metrics go to metrics.jsonl.
    #[arg(long, value_enum)]
    pub metric: Option<Metric>,
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Peak learning rate (BERT's fine-tuning recipe: 2e-5 to 5e-5).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Longer inputs are truncated (pairs from the longer text first, as HF).
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Share of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay (not applied to biases and LayerNorm).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Seeds the classifier's initialisation, the data order and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where the fine-tuned model (an HF directory) and metrics.jsonl go; must not exist
    /// or be empty.
    #[arg(long, default_value = "finetuned")]
    pub output: PathBuf,
    /// Train from random weights (the model directory's shape and vocabulary only): the
    /// baseline that shows what pretraining brings.
    #[arg(long)]
    pub from_scratch: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// The GPU to use with --backend cuda.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs a fine-tuning job and prints its table; returns its figures.
pub fn run(args: FinetuneArgs) -> Result<Summary> {
    let job = prepare(&args)?;
    with_backend(
        DeviceChoice {
            backend: args.backend,
            index: args.device,
            precision: Precision::Fp32,
        },
        job,
    )
}

/// Reads and checks everything (model, vocabulary, both files, options) and tokenises the
/// examples; nothing is written.
fn prepare(args: &FinetuneArgs) -> Result<train::Job> {
    let glue = match &args.glue_task {
        Some(name) => Some(glue::by_name(name).with_context(|| {
            let names: Vec<&str> = glue::TASKS.iter().map(|t| t.name).collect();
            format!(
                "--glue-task {name}: not a GLUE task; choose one of {}",
                names.join(", ")
            )
        })?),
        None => glue::by_directory(&args.train),
    };
    if let Some(task) = glue {
        tracing::info!("GLUE task {}: its columns, header and metric", task.name);
    }
    let text = if !args.text_columns.is_empty() {
        args.text_columns.clone()
    } else if let Some(task) = glue {
        task.text.iter().map(|s| s.to_string()).collect()
    } else if args.task == Some(TaskKind::Pair) {
        vec!["sentence1".into(), "sentence2".into()]
    } else {
        vec!["sentence".into()]
    };
    match (args.task, text.len()) {
        (_, 0) | (_, 3..) => bail!(
            "--text-columns {}: give one column (a sentence) or two (a pair)",
            text.join(",")
        ),
        (Some(TaskKind::Pair), 1) => bail!(
            "--task pair needs two --text-columns (A,B); got {}",
            text[0]
        ),
        (Some(TaskKind::Single), 2) => bail!(
            "--task single needs one --text-columns; got {}",
            text.join(",")
        ),
        _ => {}
    }
    let columns = Columns {
        text,
        label: args
            .label_column
            .clone()
            .or_else(|| glue.map(|t| t.label.to_string()))
            .unwrap_or_else(|| "label".into()),
    };
    let header = !args.no_header && glue.is_none_or(|t| t.header);
    let regression = args.regression || glue.is_some_and(|t| t.regression);
    let metric = args
        .metric
        .or(glue.map(|t| t.metric))
        .unwrap_or(if regression {
            Metric::Pearson
        } else {
            Metric::Accuracy
        });
    if metric.for_regression() != regression {
        bail!(
            "--metric {}: a {} metric, but the task is {}; choose {}",
            metric.name(),
            if regression {
                "classification"
            } else {
                "regression"
            },
            if regression {
                "a regression"
            } else {
                "a classification"
            },
            if regression {
                "pearson or spearman"
            } else {
                "accuracy, f1 or mcc"
            }
        );
    }
    if args.num_labels.is_some_and(|n| n < 2) {
        bail!("--num-labels must be at least 2; for a single numeric output pass --regression");
    }
    if args.epochs == 0 || args.batch_size == 0 || args.lr.is_nan() || args.lr <= 0.0 {
        bail!("--epochs, --batch-size and --lr must be positive");
    }
    if !(0.0..1.0).contains(&args.warmup_ratio) {
        bail!("--warmup-ratio {} must be in [0, 1)", args.warmup_ratio);
    }

    let model_dir = bertrain_coordinator::checkpoints::resolve_model_dir(&args.model)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let vocab_path = model_dir.join(VOCAB_FILE);
    if !vocab_path.exists() {
        bail!(
            "{} has no {VOCAB_FILE}: fine-tuning tokenises with the model's own vocabulary; \
             copy the vocab.txt the model was pretrained with into it",
            model_dir.display()
        );
    }
    let config = BertConfig::load(&model_dir.join(CONFIG_FILE))?;
    hf::check_vocab(&vocab_path, &config)?;
    let vocab = bertrain_dataprep::Vocab::load(&vocab_path, None)?;
    if args.max_seq_len < 3 || args.max_seq_len > config.max_position_embeddings {
        bail!(
            "--max-seq-len {}: must be between 3 and the model's {} positions",
            args.max_seq_len,
            config.max_position_embeddings
        );
    }

    let train_table = input::read_table(&args.train, header)?;
    let validation_table = input::read_table(&args.validation, header)?;
    let train_raw = input::examples(&train_table, &columns)?;
    let validation_raw = input::examples(&validation_table, &columns)?;
    let labels = LabelSpace::infer(
        &train_raw,
        &train_table,
        &columns.label,
        args.num_labels,
        regression,
    )?;
    let targets = |raw: &[input::RawExample], table: &input::Table| -> Result<Vec<input::Target>> {
        raw.iter()
            .map(|e| labels.target(e, table, &columns.label))
            .collect()
    };
    let train_targets = targets(&train_raw, &train_table)?;
    let validation_targets = targets(&validation_raw, &validation_table)?;

    let initial = initial_weights(&model_dir, &config, labels.outputs(), args)?;
    let tokenizer = data::Tokenizer::new(&vocab)?;
    let train = tokenizer.features(&train_raw, &train_targets, args.max_seq_len)?;
    let validation = tokenizer.features(&validation_raw, &validation_targets, args.max_seq_len)?;

    check_output(&args.output)?;
    Ok(train::Job {
        config,
        initial,
        labels,
        metric,
        train,
        validation,
        vocab_path,
        tokenizer_config: vocab.casing.tokenizer_config_json(),
        args: args.clone(),
        optimizer_on_device: args.backend == Backend::Cuda,
    })
}

/// The classifier's starting parameters (flat, in its layout): the pretrained encoder and
/// pooler with a classifier initialised from the seed, or all of it from the seed.
fn initial_weights(
    model_dir: &Path,
    config: &BertConfig,
    outputs: usize,
    args: &FinetuneArgs,
) -> Result<Vec<f32>> {
    let model = BertForSequenceClassification::<burn::backend::Flex>::new(
        config,
        outputs,
        &Default::default(),
    );
    let layout = ParamLayout::of(&model);
    if args.from_scratch {
        return Ok(train::random_weights(&layout, config, args.seed));
    }
    let config_text = std::fs::read_to_string(model_dir.join(CONFIG_FILE))
        .with_context(|| format!("cannot read {}", model_dir.join(CONFIG_FILE).display()))?;
    let has_head = bertrain_model::classifier::num_labels_in(&config_text);
    if has_head == Some(outputs) {
        tracing::info!(
            "{} already has a classifier with {outputs} outputs: training continues from it",
            model_dir.display()
        );
        return Ok(hf::load_dir(model_dir, &layout, args.seed)?.flat);
    }
    if let Some(n) = has_head {
        // As HF's run_glue.py (`ignore_mismatched_sizes`): the encoder is what is reused.
        tracing::warn!(
            "{} has a classifier with {n} outputs; this task needs {outputs}, so a new one is initialised",
            model_dir.display()
        );
    }
    // The encoder and pooler from the file (any head it has is left out), the classifier
    // from the seed.
    let encoder = ParamLayout {
        slots: layout
            .slots
            .iter()
            .filter(|s| !s.name.starts_with("classifier."))
            .cloned()
            .collect(),
        total: layout.total,
    };
    let mut flat = hf::load_dir(model_dir, &encoder, args.seed)?.flat;
    let fresh = train::random_weights(&layout, config, args.seed);
    for slot in layout
        .slots
        .iter()
        .filter(|s| s.name.starts_with("classifier."))
    {
        let range = slot.offset..slot.offset + slot.len;
        flat[range.clone()].copy_from_slice(&fresh[range]);
    }
    Ok(flat)
}

/// Refuses an output directory that holds anything, before anything is written.
fn check_output(output: &Path) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(output)
        && entries.next().is_some()
    {
        bail!(
            "--output {} exists and is not empty; choose another directory or remove it",
            output.display()
        );
    }
    if output.exists() && !output.is_dir() {
        bail!(
            "--output {} is a file; choose a directory",
            output.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny HF classifier fixture (96-token vocabulary, hidden 32): a model directory.
    fn fixture_model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf-tiny-classifier")
    }

    /// Arguments for a run on `train` and `validation`, written to a directory of their own
    /// under `dir` (so that several cases can be made before any runs).
    fn args(dir: &Path, train: &str, validation: &str) -> FinetuneArgs {
        static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = &dir.join(format!("case-{case}"));
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("train.tsv"), train).unwrap();
        std::fs::write(dir.join("validation.tsv"), validation).unwrap();
        FinetuneArgs {
            model: fixture_model(),
            train: dir.join("train.tsv"),
            validation: dir.join("validation.tsv"),
            task: None,
            num_labels: None,
            regression: false,
            text_columns: Vec::new(),
            label_column: None,
            no_header: false,
            glue_task: None,
            metric: None,
            epochs: 2,
            lr: 1e-3,
            batch_size: 4,
            max_seq_len: 16,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            seed: 1,
            output: dir.join("out"),
            from_scratch: false,
            backend: Backend::Cpu,
            device: 0,
            quiet: true,
        }
    }

    const TRAIN: &str = "sentence\tlabel\nthe cat sat\t1\nthe dog ran\t0\nshe sat on the mat\t1\n\
                         he ran\t0\nthe cat ran\t1\nit was the dog\t0\n";
    const VALIDATION: &str = "sentence\tlabel\nthe cat\t1\nthe dog\t0\n";

    /// Each bad input fails with one line naming the file and the column or row (and
    /// what to do), and the output directory is not created.
    #[test]
    fn bad_input_is_one_line_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let no_vocab = dir.path().join("no-vocab");
        std::fs::create_dir(&no_vocab).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture_model().join(file), no_vocab.join(file)).unwrap();
        }
        let cases: Vec<(FinetuneArgs, &[&str])> = vec![
            (
                FinetuneArgs {
                    num_labels: Some(2),
                    ..args(
                        dir.path(),
                        "sentence\tlabel\nthe cat\t1\nthe dog\t2\n",
                        VALIDATION,
                    )
                },
                &["train.tsv line 3", "outside --num-labels 2"],
            ),
            (
                args(
                    dir.path(),
                    TRAIN,
                    "sentence\tlabel\nthe cat\t1\nthe dog\t7\n",
                ),
                &["validation.tsv line 3", "\"7\""],
            ),
            (
                args(dir.path(), "text\tlabel\nthe cat\t1\n", VALIDATION),
                &["train.tsv has no column \"sentence\"", "--text-columns"],
            ),
            (
                args(dir.path(), TRAIN, "sentence\tgold\nthe cat\t1\n"),
                &["validation.tsv has no column \"label\"", "--label-column"],
            ),
            (args(dir.path(), "", VALIDATION), &["train.tsv is empty"]),
            (
                FinetuneArgs {
                    model: no_vocab.clone(),
                    ..args(dir.path(), TRAIN, VALIDATION)
                },
                &["no-vocab has no vocab.txt"],
            ),
        ];
        for (args, wanted) in cases {
            let error = format!("{:#}", run(args.clone()).unwrap_err());
            assert!(!error.contains('\n'), "one line: {error}");
            for w in wanted {
                assert!(error.contains(w), "{error:?} should contain {w:?}");
            }
            assert!(!args.output.exists(), "{error}: output written");
        }
    }

    /// With the optimizer on the device (as `--backend cuda` runs it) the fine-tuned
    /// parameters are the host path's, to float rounding: checked on the CPU backend, which
    /// runs both.
    #[test]
    fn the_optimizer_on_the_device_gives_the_host_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let weights = |name: &str, on_device: bool| {
            let mut a = args(dir.path(), TRAIN, VALIDATION);
            a.output = dir.path().join(name);
            let mut job = prepare(&a).unwrap();
            job.optimizer_on_device = on_device;
            let cpu = DeviceChoice {
                backend: Backend::Cpu,
                index: 0,
                precision: Precision::Fp32,
            };
            with_backend(cpu, job).unwrap();
            // safetensors: an 8-byte header length, the JSON header, then the f32 values.
            let bytes = std::fs::read(a.output.join(hf::WEIGHTS_FILE)).unwrap();
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let values: Vec<f32> = bytes[header..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (bytes[..header].to_vec(), values)
        };
        let (host_header, host) = weights("host", false);
        let (device_header, device) = weights("device", true);
        assert_eq!(host_header, device_header);
        let diff = host
            .iter()
            .zip(&device)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "parameters differ by {diff}");
    }

    /// Same inputs and seed: the same parameters, byte for byte; another seed: others.
    /// The output is an HF classifier directory with its metrics.
    #[test]
    fn fine_tuning_is_deterministic_and_writes_an_hf_directory() {
        let dir = tempfile::tempdir().unwrap();
        let run_with = |name: &str, seed: u64| {
            let mut a = args(dir.path(), TRAIN, VALIDATION);
            a.output = dir.path().join(name);
            a.seed = seed;
            let summary = run(a).unwrap();
            assert_eq!(summary.metric, Metric::Accuracy);
            assert!((0.0..=1.0).contains(&summary.value));
            std::fs::read(dir.path().join(name).join(hf::WEIGHTS_FILE)).unwrap()
        };
        let a = run_with("a", 1);
        assert_eq!(a, run_with("b", 1));
        assert_ne!(a, run_with("c", 2));
        let out = dir.path().join("a");
        let config = std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap();
        assert_eq!(bertrain_model::classifier::num_labels_in(&config), Some(2));
        assert!(out.join(VOCAB_FILE).exists() && out.join(hf::TOKENIZER_CONFIG_FILE).exists());
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "two epochs and the final line");
        assert_eq!(lines[1]["epoch"], 2);
        assert_eq!(
            lines[1]["step"], 4,
            "6 examples in batches of 4: 2 steps an epoch"
        );
        assert!(lines[0]["mcc"].is_number() && lines[0]["f1"].is_number());
        assert_eq!(lines[2]["final"], true);
    }
}
