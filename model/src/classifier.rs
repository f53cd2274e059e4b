//! BERT for sequence classification and regression, as HF's
//! `BertForSequenceClassification`: the pretrained encoder and pooler, dropout, and one
//! linear layer on the pooled output. Field names follow HF, so the parameters are
//! `bert.*`, `classifier.weight` and `classifier.bias` and an HF directory written from it
//! loads in `transformers` with no missing or unexpected keys.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::bert::{BertModel, Unpadding, in_f32};
use crate::config::BertConfig;
use crate::dense::DenseOps;
use crate::dropout::{self, RowKeys};

#[derive(Module, Debug)]
pub struct BertForSequenceClassification<B: Backend> {
    pub bert: BertModel<B>,
    pub dropout: Dropout,
    pub classifier: Linear<B>,
}

/// A padded batch of sequences to classify.
#[derive(Debug, Clone)]
pub struct ClassificationBatch<B: Backend> {
    /// `[batch, seq]` token ids, 0 ([PAD]) after each sequence's end.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` 0 for `[CLS] A [SEP]` (and padding), 1 for `B [SEP]`.
    pub token_type_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
}

/// The targets of a batch: class ids, or values for regression (one output).
#[derive(Debug, Clone)]
pub enum Targets<B: Backend> {
    Classes(Tensor<B, 1, Int>),
    Values(Tensor<B, 1>),
}

impl<B: Backend> BertForSequenceClassification<B> {
    /// A model with `num_labels` outputs (1: regression) and placeholder values; load
    /// weights or initialise before use.
    pub fn new(config: &BertConfig, num_labels: usize, device: &B::Device) -> Self {
        BertForSequenceClassification {
            bert: BertModel::new(config, device),
            // HF's `classifier_dropout` is unset in the configs bertrain reads and writes,
            // and then falls back to `hidden_dropout_prob`.
            dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
            classifier: LinearConfig::new(config.hidden_size, num_labels).init(device),
        }
    }
}

impl<B: DenseOps> BertForSequenceClassification<B> {
    /// `[batch, num_labels]` logits, from the unpadded encoder. `unpadding` is made on the
    /// host from the batch's mask (`Unpadding::new(mask, [rows, seq], &[])`), so a GPU step
    /// never reads it back.
    pub fn forward(&self, batch: &ClassificationBatch<B>, unpadding: &Unpadding) -> Tensor<B, 2> {
        let pooled = self.bert.pooled(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            unpadding,
        );
        self.head(pooled)
    }

    /// The same logits with the encoder computing every position, as HF does.
    pub fn forward_padded(&self, batch: &ClassificationBatch<B>) -> Tensor<B, 2> {
        let pooled = self.bert.pooled_padded(
            batch.input_ids.clone(),
            batch.token_type_ids.clone(),
            batch.attention_mask.clone(),
        );
        self.head(pooled)
    }

    fn head(&self, pooled: Tensor<B, 2>) -> Tensor<B, 2> {
        // Keyed like a hidden row, at a position no sequence has, so that the pooled
        // output's mask is not that of its [CLS] token (position 0).
        let keys = RowKeys::grid(dropout::first_sequence(), 1).with_offset(u32::MAX);
        self.classifier
            .forward(dropout::apply(&self.dropout, pooled, &keys))
    }

    /// HF's loss: the mean cross-entropy over the batch, or for regression the mean
    /// squared error of the single output (computed in f32 whatever the model computes in).
    pub fn loss(&self, logits: Tensor<B, 2>, targets: &Targets<B>) -> Tensor<B, 1> {
        let logits = in_f32(logits);
        match targets {
            Targets::Classes(labels) => {
                let n = labels.dims()[0];
                log_softmax(logits, 1)
                    .gather(1, labels.clone().reshape([n, 1]))
                    .neg()
                    .mean()
            }
            Targets::Values(values) => {
                let n = values.dims()[0];
                let diff = logits.reshape([n]) - in_f32(values.clone());
                (diff.clone() * diff).mean()
            }
        }
    }
}

/// The `config.json` of a classifier: the encoder's shape plus what transformers reads to
/// build `BertForSequenceClassification` with the right head (`architectures`,
/// `id2label`/`label2id`, whose size is `num_labels`, and `problem_type`). `labels` names
/// the classes in id order; a regression model has one output and no label names.
pub fn classifier_config_json(config: &BertConfig, labels: &[String], regression: bool) -> String {
    let mut value: serde_json::Value =
        serde_json::from_str(&config.to_hf_json()).expect("the config's own JSON");
    let object = value.as_object_mut().expect("config is an object");
    object.insert(
        "architectures".into(),
        serde_json::json!(["BertForSequenceClassification"]),
    );
    let names: Vec<String> = if regression {
        vec!["LABEL_0".into()]
    } else {
        labels.to_vec()
    };
    let id2label: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (i.to_string(), name.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), i.into()))
        .collect();
    object.insert("id2label".into(), id2label.into());
    object.insert("label2id".into(), label2id.into());
    object.insert(
        "problem_type".into(),
        if regression {
            "regression"
        } else {
            "single_label_classification"
        }
        .into(),
    );
    serde_json::to_string_pretty(&value).expect("config serialises")
}

/// The number of outputs an HF `config.json` gives a classifier (the size of its
/// `id2label`), or None when it names none (a pretraining or bare model's config).
pub fn num_labels_in(config_json: &str) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_str(config_json).ok()?;
    value.get("id2label")?.as_object().map(|m| m.len())
}
