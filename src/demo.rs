//! `bertrain demo`: the whole pipeline on the embedded synthetic corpus, on the CPU:
//! corpus -> vocabulary -> shards -> training a tiny BERT -> evaluation -> HF export ->
//! fill-mask. Everything is written under one run directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_dataprep::Manifest;
use bertrain_dataprep::cli::{DataprepArgs, VocabArgs, run_dataprep, run_vocab};
use bertrain_model::{BertConfig, hf, init_bert};
use bertrain_worker::CpuBackend;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::loader::{BatchShape, Prefetcher, SampleSource, step_data};
use bertrain_worker::optim::{OptimizerConfig, OptimizerKind};
use bertrain_worker::schedule::{Decay, LrSchedule};
use bertrain_worker::trainer::{StepStats, Trainer};

/// Marks a directory as made by the demo, so a second run may replace it (and nothing
/// else: a directory without the marker is never touched).
const MARKER: &str = ".bertrain-demo";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the corpus, vocabulary, shards, metrics and model are written.
    #[arg(long, default_value = "demo-run")]
    run_dir: PathBuf,
    /// Documents in the synthetic corpus.
    #[arg(long, default_value_t = 2000)]
    docs: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    batch_size: u64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let dir = &args.run_dir;
    prepare_run_dir(dir)?;

    println!("== 1/5 synthetic corpus ({} documents)", args.docs);
    let corpus = dir.join("corpus.txt");
    let text: Vec<String> = bertrain_dataprep::synth_corpus(args.docs, args.seed).collect();
    fs::write(&corpus, text.join("\n\n") + "\n").with_context(|| format!("writing {}", corpus.display()))?;

    println!("== 2/5 WordPiece vocabulary");
    let vocab = dir.join("vocab.txt");
    run_vocab(VocabArgs {
        input: vec![corpus.clone()],
        vocab_size: 8000,
        lowercase: true,
        cased: false,
        output: vocab.clone(),
        overwrite: true,
    })?;

    println!("== 3/5 shards");
    let data = dir.join("data");
    run_dataprep(DataprepArgs {
        input: vec![corpus],
        vocab: vocab.clone(),
        output: data.clone(),
        max_seq_len: 128,
        max_predictions: 20,
        masked_lm_prob: 0.15,
        short_seq_prob: 0.1,
        dupe_factor: 3,
        whole_word_mask: false,
        seed: args.seed,
        shard_rows: 8192,
        row_group_rows: 1024,
        threads: None,
        validation_fraction: 0.05,
        window_mb: 4,
        lowercase: true,
        cased: false,
        overwrite: true,
        quiet: true,
    })?;

    println!("== 4/5 training the tiny model ({} steps of {} sequences)", args.steps, args.batch_size);
    let mut config = BertConfig::preset("tiny")?;
    config.vocab_size = fs::read_to_string(&vocab)?.lines().count();
    let manifest = Manifest::load(&data)?;
    manifest.verify_files()?;
    let device = Default::default();
    let model = init_bert::<CpuBackend>(&config, args.seed, &device);
    let optimizer = OptimizerConfig::bert(OptimizerKind::AdamW, 0.01);
    let mut trainer = Trainer::new(model, optimizer, 1.0, args.seed, device);
    let schedule = LrSchedule {
        peak: args.lr,
        warmup_steps: args.steps / 10,
        max_steps: args.steps,
        decay: Decay::Linear,
    };
    let shape = BatchShape { global_batch: args.batch_size, micro_batch: args.batch_size as usize, rank: 0, world: 1 };
    let loader = Prefetcher::start(SampleSource::new(manifest, args.seed)?, shape, 0, 4);
    let mut collective = LocalCollective;
    let mut metrics = String::new();
    let mut last = StepStats::default();
    let mut tokens = 0usize;
    let train_started = Instant::now();
    for step in 0..args.steps {
        let data = loader.next()?;
        let lr = schedule.at(step);
        last = trainer.step(step, 0, &data.micro_batches, lr as f32, &mut collective)?;
        tokens += last.tokens;
        let tokens_per_s = tokens as f64 / train_started.elapsed().as_secs_f64();
        metrics += &serde_json::json!({
            "step": step + 1, "loss": last.loss, "mlm_loss": last.mlm_loss, "nsp_loss": last.nsp_loss,
            "mlm_accuracy": last.mlm_accuracy, "nsp_accuracy": last.nsp_accuracy, "lr": lr,
            "tokens_per_s": tokens_per_s,
        })
        .to_string();
        metrics.push('\n');
        if (step + 1) % 25 == 0 || step + 1 == args.steps {
            println!(
                "step {:>4}/{}  loss {:.3}  mlm acc {:.3}  nsp acc {:.3}  lr {:.2e}  {:.0} tokens/s",
                step + 1, args.steps, last.loss, last.mlm_accuracy, last.nsp_accuracy, lr, tokens_per_s
            );
        }
    }
    drop(loader);
    let tokens_per_s = tokens as f64 / train_started.elapsed().as_secs_f64();
    fs::write(dir.join("metrics.jsonl"), metrics)?;

    println!("== 5/5 evaluation, export, fill-mask");
    let validation = Manifest::load(&data.join("validation"))?;
    let rows = validation.total_rows().min(512);
    let mut source = SampleSource::new(validation, args.seed)?;
    let eval_shape = BatchShape { global_batch: rows, micro_batch: 64, rank: 0, world: 1 };
    let eval = trainer.evaluate(&step_data(&mut source, eval_shape, 0)?.micro_batches);
    let model_dir = dir.join("model");
    hf::save_dir(&model_dir, &config, &trainer.layout, &trainer.params, Some(&vocab))?;
    fs::copy(dir.join("tokenizer_config.json"), model_dir.join("tokenizer_config.json")).ok();

    for (sentence, answer) in probe_sentences(args.docs, args.seed) {
        let guesses = crate::fill_mask::fill_mask(&model_dir, &sentence, 3)?;
        let shown: Vec<String> = guesses[0].iter().map(|(t, p)| format!("{t} ({p:.2})")).collect();
        println!("  {sentence}\n    answer: {answer}   model: {}", shown.join(", "));
    }

    println!();
    println!("summary");
    println!("  steps                {}", args.steps);
    println!("  training tokens/s    {tokens_per_s:.0}");
    println!("  last step            loss {:.3}, MLM acc {:.3}, NSP acc {:.3}", last.loss, last.mlm_accuracy, last.nsp_accuracy);
    println!("  validation ({rows} seq)  MLM acc {:.3}, NSP acc {:.3}, MLM loss {:.3} (perplexity {:.1})",
        eval.mlm_accuracy, eval.nsp_accuracy, eval.mlm_loss, eval.mlm_loss.exp());
    println!("  chance               MLM acc {:.4}, NSP acc 0.5", 1.0 / config.vocab_size as f64);
    println!("  written to           {}/ (corpus.txt, vocab.txt, data/, metrics.jsonl, model/)", dir.display());
    println!("  total time           {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
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
        fs::remove_dir_all(dir).with_context(|| format!("removing the old demo run {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join(MARKER), "made by `bertrain demo`; removed by the next demo run\n")?;
    Ok(())
}

/// Sentences from a document the model never saw (the generator's next one), each with
/// one word replaced by [MASK], and that word.
fn probe_sentences(docs: usize, seed: u64) -> Vec<(String, String)> {
    let unseen = bertrain_dataprep::synth_corpus(docs + 1, seed).last().unwrap_or_default();
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
