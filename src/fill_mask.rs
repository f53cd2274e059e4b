//! `bertrain fill-mask`: the model's top-k guesses for each [MASK] of a sentence.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bertrain_model::hf::{self, VOCAB_FILE};
use bertrain_model::{BertConfig, BertForPreTraining, ParamLayout, load_flat_params};
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::activation::softmax;

#[derive(clap::Args)]
pub struct FillMaskArgs {
    /// An HF directory (config.json, model.safetensors, vocab.txt), a bertrain checkpoint
    /// directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// Predictions per [MASK].
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Text with one or more [MASK] tokens.
    text: String,
}

/// One [MASK]'s predictions: (token, probability), best first.
pub type Guesses = Vec<(String, f32)>;

pub fn run(args: FillMaskArgs) -> Result<()> {
    let predictions = fill_mask(&args.model, &args.text, args.top_k)?;
    if args.json {
        let json: Vec<_> = predictions
            .iter()
            .map(|g| {
                g.iter()
                    .map(|(t, p)| serde_json::json!({"token": t, "score": p}))
                    .collect::<Vec<_>>()
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    for (i, guesses) in predictions.iter().enumerate() {
        let line: Vec<String> = guesses
            .iter()
            .map(|(t, p)| format!("{t} ({p:.3})"))
            .collect();
        println!("[MASK] {}: {}", i + 1, line.join(", "));
    }
    Ok(())
}

/// Top-`k` predictions for each [MASK] in `text`, in order.
pub fn fill_mask(model_dir: &std::path::Path, text: &str, k: usize) -> Result<Vec<Guesses>> {
    // A run directory stands for its newest checkpoint.
    let resolved = bertrain_coordinator::checkpoints::resolve_model_dir(model_dir)?;
    let model_dir = resolved.as_path();
    let vocab = model_dir.join(VOCAB_FILE);
    let words = bertrain_dataprep::Vocab::load(&vocab, None)?;
    let tokenizer = words.tokenizer()?;
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenise the text: {e}"))?;
    let unknown: Vec<&str> = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .filter(|(id, _)| **id == words.unk)
        .filter_map(|(_, &(start, end))| text.get(start..end))
        .filter(|word| *word != "[UNK]")
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            "the vocabulary of {} cannot spell {:?}: the model sees [UNK] there (it reads text {})",
            model_dir.display(),
            unknown,
            if words.casing.lowercase {
                "lowercased"
            } else {
                "cased"
            }
        );
    }
    let mask_id = tokenizer
        .token_to_id("[MASK]")
        .with_context(|| format!("{} has no [MASK] token", vocab.display()))?;
    let cls = tokenizer
        .token_to_id("[CLS]")
        .context("vocabulary has no [CLS] token")?;
    let sep = tokenizer
        .token_to_id("[SEP]")
        .context("vocabulary has no [SEP] token")?;
    let mut ids: Vec<i64> = vec![cls as i64];
    ids.extend(encoding.get_ids().iter().map(|&i| i as i64));
    ids.push(sep as i64);
    let positions: Vec<i64> = (0..ids.len() as i64)
        .filter(|&p| ids[p as usize] == mask_id as i64)
        .collect();
    if positions.is_empty() {
        bail!("the text has no [MASK] token: write [MASK] where the model should guess");
    }

    let device = Default::default();
    let config = BertConfig::load(&model_dir.join(hf::CONFIG_FILE))?;
    hf::check_vocab(&vocab, &config)?;
    if ids.len() > config.max_position_embeddings {
        bail!(
            "the text is {} tokens long; this model reads at most {}",
            ids.len(),
            config.max_position_embeddings
        );
    }
    let model = BertForPreTraining::<Flex>::new(&config, &device);
    let layout = ParamLayout::of(&model);
    let weights = hf::load_dir(model_dir, &layout, 0)?;
    if !weights.initialised.is_empty() {
        bail!(
            "{} has no MLM head (a bare BertModel): fill-mask needs a pretraining checkpoint",
            model_dir.display()
        );
    }
    let model = load_flat_params(model, &weights.flat, &layout);

    let len = ids.len();
    let n = positions.len();
    let ints2 =
        |v: Vec<i64>| Tensor::<Flex, 2, Int>::from_data(TensorData::new(v, [1, len]), &device);
    let batch = bertrain_model::PretrainingBatch {
        input_ids: ints2(ids),
        token_type_ids: ints2(vec![0; len]),
        attention_mask: ints2(vec![1; len]),
        masked_positions: Tensor::from_data(TensorData::new(positions, [n]), &device),
        masked_lm_ids: Tensor::zeros([n], &device),
        masked_lm_weights: Tensor::zeros([n], &device),
        next_sentence_labels: Tensor::zeros([1], &device),
    };
    let probs = softmax(model.forward(&batch).mlm_logits, 1)
        .into_data()
        .to_vec::<f32>()?;
    let vocab_size = config.vocab_size;
    Ok(probs
        .chunks(vocab_size)
        .map(|row| {
            let mut order: Vec<usize> = (0..vocab_size).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order
                .into_iter()
                .take(k)
                .map(|id| {
                    (
                        tokenizer.id_to_token(id as u32).unwrap_or_default(),
                        row[id],
                    )
                })
                .collect()
        })
        .collect())
}
