//! `BertConfig`: the model's shape, with Hugging Face `config.json` field names so that
//! an HF directory's config reads and writes without translation.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of a BERT encoder. Field names are those of HF `BertConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
}

/// The keys of [`BertConfig`], all required.
const CONFIG_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
];

/// Keys that HF writes into `config.json` beside the model's shape. They carry nothing
/// this model needs, so they are accepted and ignored; any other key is an error, because
/// a misspelt key silently falling back to a default is how a 340M run trains a 110M model.
const HF_BOOKKEEPING_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
    "classifier_dropout",
    "gradient_checkpointing",
    "_name_or_path",
    "_attn_implementation_autoset",
    "id2label",
    "label2id",
    "tie_word_embeddings",
    "is_decoder",
    "add_cross_attention",
    "chunk_size_feed_forward",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "directionality",
    "pooler_fc_size",
    "pooler_num_attention_heads",
    "pooler_num_fc_layers",
    "pooler_size_per_head",
    "pooler_type",
];

/// A named model size. The paper's base and large plus the small sizes of Turc et al.'s
/// "Well-Read Students Learn Better" family, which are what one trains to check a setup.
pub const PRESETS: &[(&str, usize, usize, usize)] = &[
    // name, layers, hidden, heads
    ("tiny", 2, 128, 2),
    ("mini", 4, 256, 4),
    ("small", 4, 512, 8),
    ("medium", 8, 512, 8),
    ("base", 12, 768, 12),
    ("large", 24, 1024, 16),
];

impl BertConfig {
    /// The config of a preset size with BERT's defaults for everything else
    /// (30522-token uncased vocabulary, 512 positions, feed-forward 4H).
    pub fn preset(name: &str) -> Result<BertConfig> {
        let Some(&(_, layers, hidden, heads)) = PRESETS.iter().find(|p| p.0 == name) else {
            let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
            bail!(
                "unknown model preset {name:?}: choose one of {}",
                names.join(", ")
            );
        };
        Ok(BertConfig {
            vocab_size: 30522,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
        })
    }

    /// A preset name, or a path to a JSON config (HF `config.json` or one of `configs/`).
    pub fn from_name_or_file(name_or_path: &str) -> Result<BertConfig> {
        if PRESETS.iter().any(|p| p.0 == name_or_path) {
            return BertConfig::preset(name_or_path);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<_> = PRESETS.iter().map(|p| p.0).collect();
            bail!(
                "{name_or_path}: no such config file, and not a preset ({})",
                names.join(", ")
            );
        }
        BertConfig::load(path)
    }

    /// Reads a JSON config, refusing unknown keys and impossible shapes. Errors name the
    /// file and the key.
    pub fn load(path: &Path) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        BertConfig::parse(&text).with_context(|| format!("model config {}", path.display()))
    }

    /// Parses JSON text (see [`BertConfig::load`]).
    pub fn parse(text: &str) -> Result<BertConfig> {
        let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let Some(object) = value.as_object() else {
            bail!("expected a JSON object");
        };
        let known = CONFIG_KEYS;
        let mut fields = serde_json::Map::new();
        for (key, v) in object {
            if known.contains(&key.as_str()) {
                fields.insert(key.clone(), v.clone());
            } else if key == "position_embedding_type" {
                if v.as_str() != Some("absolute") {
                    bail!("key position_embedding_type = {v}: only \"absolute\" is supported");
                }
            } else if !HF_BOOKKEEPING_KEYS.contains(&key.as_str()) {
                bail!(
                    "unknown key {key:?} (a BERT config has: {})",
                    known.join(", ")
                );
            }
        }
        for key in known {
            if !fields.contains_key(*key) {
                bail!("missing key {key:?}");
            }
        }
        let config: BertConfig = serde_json::from_value(serde_json::Value::Object(fields))
            .context("a key has a value of the wrong type")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the shape is one a model can have; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("key {key} must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "key num_attention_heads = {} does not divide hidden_size = {}",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        if self.hidden_act != "gelu" {
            bail!(
                "key hidden_act = {:?}: only \"gelu\" (the erf form BERT uses) is supported",
                self.hidden_act
            );
        }
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("key {key} = {p} must be in [0, 1)");
            }
        }
        // Written so that NaN is refused too.
        let positive = |x: f64| x > 0.0;
        if !positive(self.layer_norm_eps) || !positive(self.initializer_range) {
            bail!("keys layer_norm_eps and initializer_range must be positive");
        }
        Ok(())
    }

    /// The JSON an HF directory holds: the shape plus the keys transformers needs to pick
    /// the class (`model_type`, `architectures`).
    pub fn to_hf_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let object = value.as_object_mut().expect("config is an object");
        object.insert("model_type".into(), "bert".into());
        object.insert(
            "architectures".into(),
            serde_json::json!(["BertForPreTraining"]),
        );
        object.insert("position_embedding_type".into(), "absolute".into());
        object.insert("pad_token_id".into(), 0.into());
        serde_json::to_string_pretty(&value).expect("config serialises")
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of parameters of `BertForPreTraining` (the MLM decoder shares the word
    /// embeddings, so it is counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let embeddings =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h;
        let pooler = h * h + h;
        let mlm_head = h * h + h + 2 * h + self.vocab_size;
        let nsp_head = 2 * h + 2;
        embeddings + self.num_hidden_layers * layer + pooler + mlm_head + nsp_head
    }

    /// Training FLOPs per token (forward + backward = 3x forward, multiply-add = 2 FLOPs)
    /// at sequence length `seq_len`, with the MLM head evaluated at `predictions_per_seq`
    /// positions only, as this project does.
    pub fn train_flops_per_token(&self, seq_len: usize, predictions_per_seq: usize) -> f64 {
        let h = self.hidden_size as f64;
        let i = self.intermediate_size as f64;
        let l = seq_len as f64;
        // Per token and layer: QKV + output projections, feed-forward, attention scores
        // and the weighted sum (each l*h multiply-adds per token).
        let per_layer = 4.0 * h * h + 2.0 * h * i + 2.0 * l * h;
        let encoder = self.num_hidden_layers as f64 * per_layer;
        let pooler_nsp = (h * h + 2.0 * h) / l;
        let mlm = (predictions_per_seq as f64 / l) * (h * h + h * self.vocab_size as f64);
        3.0 * 2.0 * (encoder + pooler_nsp + mlm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_shapes() {
        let base = BertConfig::preset("base").unwrap();
        // The paper's "110M": 109.5M with the NSP and MLM heads of BertForPreTraining.
        let n = base.num_parameters();
        assert!((109_000_000..111_000_000).contains(&n), "{n}");
        let large = BertConfig::preset("large").unwrap();
        let n = large.num_parameters();
        assert!((334_000_000..337_000_000).contains(&n), "{n}");
        assert!(BertConfig::preset("huge").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let mut v = serde_json::to_value(BertConfig::preset("tiny").unwrap()).unwrap();
        v["hiden_size"] = 3.into();
        let err = BertConfig::parse(&v.to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown key \"hiden_size\""),
            "{err:#}"
        );
    }

    #[test]
    fn heads_must_divide_hidden() {
        let mut v = serde_json::to_value(BertConfig::preset("tiny").unwrap()).unwrap();
        v["num_attention_heads"] = 3.into();
        let err = BertConfig::parse(&v.to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("num_attention_heads"),
            "{err:#}"
        );
    }

    /// `configs/models/NAME.json` is the preset NAME, so the files cannot drift.
    #[test]
    fn preset_files_equal_the_presets() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models");
        for (name, ..) in PRESETS {
            let file = BertConfig::load(&dir.join(format!("{name}.json"))).unwrap();
            assert_eq!(file, BertConfig::preset(name).unwrap(), "{name}");
        }
    }

    #[test]
    fn hf_json_round_trips() {
        let config = BertConfig::preset("mini").unwrap();
        assert_eq!(BertConfig::parse(&config.to_hf_json()).unwrap(), config);
    }
}
