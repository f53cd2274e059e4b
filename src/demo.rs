//! `bertrain demo`: the whole system on the embedded synthetic corpus, on the CPU:
//! corpus -> vocabulary -> shards -> a coordinator and two workers training the tiny BERT
//! (the job `configs/tiny.toml`, embedded) -> evaluation -> fill-mask -> fine-tuning on a
//! classification task of the corpus, against the same model from random weights.
//! Everything is written under one directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_coordinator::{LaunchArgs, Override};
use bertrain_dataprep::DataprepOptions;
use bertrain_dataprep::cli::{DataprepArgs, VocabArgs, run_dataprep, run_vocab};
use bertrain_dataprep::pipeline::DEFAULT_WINDOW_MB;

/// Marks a directory as made by the demo, so a second run may replace it (and nothing
/// else: a directory without the marker is never touched).
const MARKER: &str = ".bertrain-demo";

/// The demo's job, `configs/tiny.toml`; its paths are replaced by the demo's own.
const DEMO_JOB: &str = include_str!("../configs/tiny.toml");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the corpus, vocabulary, shards, metrics and model are written.
    #[arg(long, default_value = "demo-run")]
    run_dir: PathBuf,
    /// Documents in the synthetic corpus.
    #[arg(long, default_value_t = 2000)]
    docs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Override a key of the demo job (configs/tiny.toml), e.g. `--set train.max_steps=100`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<Override>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    prepare_run_dir(&args.run_dir)?;
    let dir = args
        .run_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.run_dir.display()))?;

    println!(
        "== 1/4 data: synthetic corpus ({} documents), WordPiece vocabulary, shards",
        args.docs
    );
    let data = synthetic_dataset(&dir, args.docs, args.seed)?;

    println!(
        "== 2/4 training: a coordinator and {} workers (job configs/tiny.toml)",
        args.workers
    );
    let job_file = write_demo_job(&dir)?;
    let run = dir.join("run");
    let mut overrides: Vec<Override> = demo_job_settings(&run, &data, args.seed, args.workers)
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    overrides.extend(args.overrides.iter().cloned());
    let train_started = Instant::now();
    bertrain_coordinator::launch::run(LaunchArgs {
        config: job_file,
        workers: None,
        backend: None,
        overrides,
        resume: false,
    })?;
    let train_s = train_started.elapsed().as_secs_f64();

    println!("== 3/4 export to Hugging Face format, fill-mask with the trained model");
    let model_dir = dir.join("model");
    crate::export::run(crate::export::ExportArgs {
        checkpoint: run.clone(),
        output: model_dir.clone(),
        overwrite: true,
    })?;
    for (sentence, answer) in probe_sentences(args.docs, args.seed) {
        let guesses = crate::fill_mask::fill_mask(&model_dir, &sentence, 3)?;
        let shown: Vec<String> = guesses[0]
            .iter()
            .map(|(t, p)| format!("{t} ({p:.2})"))
            .collect();
        println!(
            "  {sentence}\n    answer: {answer}   model: {}",
            shown.join(", ")
        );
    }

    println!(
        "== 4/4 fine-tuning: which of the {} regions a sentence comes from, pretrained vs from random weights",
        REGIONS
    );
    let finetuned = finetune_regions(&dir, &model_dir, args.docs, args.seed)?;

    crate::plot::run(crate::plot::PlotArgs {
        run: run.clone(),
        output: None,
    })?;
    let summary = Summary::read(&run.join("metrics.jsonl"))?;
    let vocab_size = fs::read_to_string(data.join("vocab.txt"))?.lines().count();
    println!();
    println!("summary");
    println!(
        "  steps                {} with {} workers in {train_s:.0} s",
        summary.steps, args.workers
    );
    println!(
        "  training tokens/s    {:.0} (all workers)",
        summary.mean_tokens_per_s
    );
    println!(
        "  last step            loss {:.3}, MLM acc {:.3}, NSP acc {:.3}",
        summary.last_loss, summary.last_mlm_accuracy, summary.last_nsp_accuracy
    );
    match &summary.validation {
        Some(v) => println!(
            "  validation           MLM acc {:.3}, NSP acc {:.3}, MLM loss {:.3} (perplexity {:.1})",
            v.mlm_accuracy, v.nsp_accuracy, v.mlm_loss, v.perplexity
        ),
        None => println!("  validation           none recorded"),
    }
    println!(
        "  chance               MLM acc {:.4}, NSP acc 0.5",
        1.0 / vocab_size as f64
    );
    let [pretrained, scratch] = &finetuned;
    println!(
        "  fine-tuning          region of a sentence ({REGIONS} classes, chance {:.3}): accuracy {:.3} pretrained \
         ({:.1} s), {:.3} from random weights ({:.1} s)",
        1.0 / REGIONS as f64,
        pretrained.value,
        pretrained.wall_seconds,
        scratch.value,
        scratch.wall_seconds
    );
    println!("  written to           {}/", dir.display());
    println!("                       corpus.txt, vocab.txt, data/ (shards), job.toml,");
    println!(
        "                       run/ (metrics.jsonl, training.svg, checkpoints/, journal.jsonl), model/ (HF),"
    );
    println!(
        "                       finetune/ (train.tsv, validation.tsv, pretrained/, scratch/: metrics.jsonl + HF)"
    );
    println!(
        "  total time           {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Steps 1 to 3 of the demo's pipeline under `dir`: the synthetic corpus (`corpus.txt`),
/// its WordPiece vocabulary (`vocab.txt`) and the shards with a validation split
/// (`data/`, which also holds the vocabulary). Returns the dataset directory.
pub(crate) fn synthetic_dataset(dir: &Path, docs: usize, seed: u64) -> Result<PathBuf> {
    let corpus = dir.join("corpus.txt");
    let text: Vec<String> = bertrain_dataprep::synth_corpus(docs, seed).collect();
    fs::write(&corpus, text.join("\n\n") + "\n")
        .with_context(|| format!("writing {}", corpus.display()))?;

    let vocab = dir.join("vocab.txt");
    run_vocab(VocabArgs {
        input: vec![corpus.clone()],
        vocab_size: 8000,
        lowercase: true,
        cased: false,
        output: vocab.clone(),
        overwrite: true,
    })?;

    let data = dir.join("data");
    run_dataprep(DataprepArgs {
        input: vec![corpus],
        vocab,
        output: data.clone(),
        options: DataprepOptions {
            dupe_factor: 3,
            seed,
            shard_rows: 8192,
            validation_fraction: 0.05,
            ..Default::default()
        },
        threads: None,
        window_mb: DEFAULT_WINDOW_MB,
        lowercase: true,
        cased: false,
        overwrite: true,
        quiet: true,
    })?;
    Ok(data)
}

/// The synthetic corpus's regions, the classes of the demo's fine-tuning task.
const REGIONS: usize = 12;
/// Labelled documents for the fine-tuning task, after the pretraining corpus's (so that
/// no sentence of them was seen in pretraining): few, as in the tasks pretraining helps
/// most with.
const FINETUNE_TRAIN_DOCS: usize = 40;
const FINETUNE_VALIDATION_DOCS: usize = 60;

/// Step 4: fine-tunes the exported model on "which region does this sentence come from"
/// and the same model from random weights with the same data, steps and seed. Returns
/// both runs' figures (pretrained, then from scratch).
fn finetune_regions(
    dir: &Path,
    model_dir: &Path,
    docs: usize,
    seed: u64,
) -> Result<[bertrain_finetune::Summary; 2]> {
    let task = dir.join("finetune");
    fs::create_dir_all(&task).with_context(|| format!("creating {}", task.display()))?;
    let options = bertrain_dataprep::SynthOptions::new(
        docs + FINETUNE_TRAIN_DOCS + FINETUNE_VALIDATION_DOCS,
        seed,
    );
    let labelled: Vec<(&str, String)> = bertrain_dataprep::synth_corpus_regions(options)
        .skip(docs)
        .collect();
    let write = |name: &str, documents: &[(&str, String)]| -> Result<PathBuf> {
        let mut text = String::from("sentence\tregion\n");
        for (region, document) in documents {
            for sentence in document.lines() {
                text += &format!("{sentence}\t{region}\n");
            }
        }
        let path = task.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let train = write("train.tsv", &labelled[..FINETUNE_TRAIN_DOCS])?;
    let validation = write("validation.tsv", &labelled[FINETUNE_TRAIN_DOCS..])?;
    let run = |name: &str, from_scratch: bool| {
        bertrain_finetune::run(bertrain_finetune::FinetuneArgs {
            model: model_dir.to_path_buf(),
            train: train.clone(),
            validation: validation.clone(),
            task: None,
            num_labels: None,
            regression: false,
            text_columns: vec!["sentence".into()],
            label_column: Some("region".into()),
            no_header: false,
            glue_task: None,
            metric: None,
            epochs: 3,
            lr: 2e-4,
            batch_size: 16,
            max_seq_len: 64,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            seed,
            output: task.join(name),
            from_scratch,
            backend: bertrain_coordinator::job::Backend::Cpu,
            device: 0,
            quiet: true,
        })
    };
    Ok([run("pretrained", false)?, run("scratch", true)?])
}

/// Writes the demo's job (`configs/tiny.toml`, embedded) to `dir/job.toml`.
pub(crate) fn write_demo_job(dir: &Path) -> Result<PathBuf> {
    let job_file = dir.join("job.toml");
    fs::write(&job_file, DEMO_JOB).with_context(|| format!("writing {}", job_file.display()))?;
    Ok(job_file)
}

/// `--set` values that point the demo's job at `run` and the dataset `data`.
pub(crate) fn demo_job_settings(run: &Path, data: &Path, seed: u64, workers: u32) -> Vec<String> {
    vec![
        format!("job.run_dir={}", run.display()),
        format!("data.manifest={}", data.join("manifest.json").display()),
        format!(
            "data.validation_manifest={}",
            data.join("validation/manifest.json").display()
        ),
        format!("train.seed={seed}"),
        format!("cluster.world_size={workers}"),
    ]
}

/// The figures the demo prints, read back from the job's `metrics.jsonl`.
struct Summary {
    steps: u64,
    mean_tokens_per_s: f64,
    last_loss: f64,
    last_mlm_accuracy: f64,
    last_nsp_accuracy: f64,
    validation: Option<Validation>,
}

struct Validation {
    mlm_accuracy: f64,
    nsp_accuracy: f64,
    mlm_loss: f64,
    perplexity: f64,
}

impl Summary {
    fn read(path: &Path) -> Result<Summary> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut steps = Vec::new();
        let mut validation = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not JSON: {line}", path.display()))?;
            let f = |key: &str| v[key].as_f64().unwrap_or(f64::NAN);
            if v.get("split").is_some() {
                validation = Some(Validation {
                    mlm_accuracy: f("mlm_accuracy"),
                    nsp_accuracy: f("nsp_accuracy"),
                    mlm_loss: f("mlm_loss"),
                    perplexity: f("perplexity"),
                });
            } else {
                steps.push((
                    f("step") as u64,
                    f("loss"),
                    f("mlm_accuracy"),
                    f("nsp_accuracy"),
                    f("tokens_per_s"),
                ));
            }
        }
        let Some(&(last_step, loss, mlm, nsp, _)) = steps.last() else {
            bail!("{} records no step", path.display());
        };
        Ok(Summary {
            steps: last_step,
            mean_tokens_per_s: steps.iter().map(|s| s.4).sum::<f64>() / steps.len() as f64,
            last_loss: loss,
            last_mlm_accuracy: mlm,
            last_nsp_accuracy: nsp,
            validation,
        })
    }
}

/// Creates `dir`, or empties it if an earlier demo made it. Refuses any other directory.
fn prepare_run_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by the demo; choose another --run-dir",
                dir.display()
            );
        }
        fs::remove_dir_all(dir)
            .with_context(|| format!("removing the old demo run {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(
        dir.join(MARKER),
        "made by `bertrain demo`; removed by the next demo run\n",
    )?;
    Ok(())
}

/// Sentences from a document the model never saw (the generator's next one), each with
/// one word replaced by [MASK], and that word.
fn probe_sentences(docs: usize, seed: u64) -> Vec<(String, String)> {
    let unseen = bertrain_dataprep::synth_corpus(docs + 1, seed)
        .last()
        .unwrap_or_default();
    unseen
        .lines()
        .take(3)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let pick = (1..words.len().saturating_sub(1)).find(|&i| words[i].len() > 3)?;
            let answer = words[pick].to_lowercase();
            let mut masked = words.clone();
            masked[pick] = "[MASK]";
            Some((masked.join(" "), answer))
        })
        .collect()
}
