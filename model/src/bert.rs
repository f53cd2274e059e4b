//! BERT for pretraining, in one file: embeddings, post-LN encoder, pooler, MLM and NSP
//! heads. Module and field names follow Hugging Face's `BertForPreTraining`
//! (`bert.encoder.layer.3.attention.self.query`) so that [`crate::hf`] maps parameters by
//! a few renames; the only structural differences are that burn stores a linear layer's
//! weight as `[in, out]` (HF: `[out, in]`) and LayerNorm's as `gamma`/`beta`.
//!
//! Activations between layers are kept as `[tokens, hidden]` matrices (batch and
//! sequence flattened) so that every dense layer is one plain matmul; only attention
//! looks at the `[batch, heads, seq, head_dim]` view.

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::prelude::*;
use burn::tensor::activation::{gelu, log_softmax, softmax, tanh};
use burn::tensor::{DType, FloatDType};

use crate::config::BertConfig;
use crate::dropout;

/// Added to the attention scores of padding positions. Large enough that softmax gives
/// them exactly zero weight in fp32 and bf16; not `-inf`, so that a fully padded row
/// (which never occurs: [CLS] is always present) could not produce NaN.
const MASKED_SCORE: f32 = -1.0e9;

/// A batch of pretraining instances, padded to the longest sequence in the batch.
#[derive(Debug, Clone)]
pub struct PretrainingBatch<B: Backend> {
    /// `[batch, seq]` token ids, 0 ([PAD]) after each sequence's end.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` 0 for segment A (and padding), 1 for segment B.
    pub token_type_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// `[masked]` positions to predict, as `row * seq + position` into the flattened batch.
    pub masked_positions: Tensor<B, 1, Int>,
    /// `[masked]` the original token at each masked position.
    pub masked_lm_ids: Tensor<B, 1, Int>,
    /// `[masked]` weight of each prediction in the MLM loss; see [`PretrainingLoss`].
    pub masked_lm_weights: Tensor<B, 1>,
    /// `[batch]` 0 = IsNext, 1 = NotNext.
    pub next_sentence_labels: Tensor<B, 1, Int>,
}

/// Logits of both heads. MLM logits exist only at the masked positions: `[masked, vocab]`.
#[derive(Debug, Clone)]
pub struct PretrainingOutput<B: Backend> {
    pub mlm_logits: Tensor<B, 2>,
    pub nsp_logits: Tensor<B, 2>,
}

/// The losses of one batch.
///
/// `mlm = sum(weight_i * cross_entropy_i) / batch`. With weights `1 / predictions in the
/// sequence` every sequence counts equally, which makes the loss of a batch the mean of
/// its sequences' losses: splitting a global batch over ranks and micro-batches then
/// gives exactly the same gradient as computing it in one piece. With weights
/// `batch / predictions in the batch` it is HF's mean over masked tokens.
#[derive(Debug, Clone)]
pub struct PretrainingLoss<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub mlm_loss: Tensor<B, 1>,
    pub nsp_loss: Tensor<B, 1>,
}

#[derive(Module, Debug)]
pub struct BertForPreTraining<B: Backend> {
    pub bert: BertModel<B>,
    pub cls: PreTrainingHeads<B>,
}

#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub encoder: Encoder<B>,
    pub pooler: Pooler<B>,
}

#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub token_type_embeddings: Embedding<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub layer: Vec<EncoderLayer<B>>,
}

#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    pub attention: Attention<B>,
    pub intermediate: Intermediate<B>,
    pub output: Output<B>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// HF calls this `self`, which Rust reserves.
    pub self_attention: SelfAttention<B>,
    pub output: Output<B>,
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub dropout: Dropout,
    pub num_heads: usize,
}

/// Dense + dropout + residual + LayerNorm: the end of both sublayers of a post-LN layer
/// (HF's `BertSelfOutput` and `BertOutput` are the same shape).
#[derive(Module, Debug)]
pub struct Output<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

#[derive(Module, Debug)]
pub struct Intermediate<B: Backend> {
    pub dense: Linear<B>,
}

#[derive(Module, Debug)]
pub struct Pooler<B: Backend> {
    pub dense: Linear<B>,
}

#[derive(Module, Debug)]
pub struct PreTrainingHeads<B: Backend> {
    pub predictions: LmPredictionHead<B>,
    pub seq_relationship: Linear<B>,
}

/// The MLM head. Its decoder is the word-embedding matrix (tied), so only the transform
/// and the output bias are parameters of their own.
#[derive(Module, Debug)]
pub struct LmPredictionHead<B: Backend> {
    pub transform: PredictionTransform<B>,
    pub bias: burn::module::Param<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
pub struct PredictionTransform<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
}

impl<B: Backend> BertForPreTraining<B> {
    /// A model of the given shape with placeholder values. Call
    /// [`crate::init::init_bert_weights`] (or load weights) before use.
    pub fn new(config: &BertConfig, device: &B::Device) -> Self {
        let h = config.hidden_size;
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let layer_norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let hidden_dropout = || DropoutConfig::new(config.hidden_dropout_prob).init();
        let embedding = |n| EmbeddingConfig::new(n, h).init(device);
        let output = |i| Output {
            dense: linear(i, h),
            layer_norm: layer_norm(),
            dropout: hidden_dropout(),
        };
        let layer = (0..config.num_hidden_layers)
            .map(|_| EncoderLayer {
                attention: Attention {
                    self_attention: SelfAttention {
                        query: linear(h, h),
                        key: linear(h, h),
                        value: linear(h, h),
                        dropout: DropoutConfig::new(config.attention_probs_dropout_prob).init(),
                        num_heads: config.num_attention_heads,
                    },
                    output: output(h),
                },
                intermediate: Intermediate {
                    dense: linear(h, config.intermediate_size),
                },
                output: output(config.intermediate_size),
            })
            .collect();
        BertForPreTraining {
            bert: BertModel {
                embeddings: Embeddings {
                    word_embeddings: embedding(config.vocab_size),
                    position_embeddings: embedding(config.max_position_embeddings),
                    token_type_embeddings: embedding(config.type_vocab_size),
                    layer_norm: layer_norm(),
                    dropout: hidden_dropout(),
                },
                encoder: Encoder { layer },
                pooler: Pooler {
                    dense: linear(h, h),
                },
            },
            cls: PreTrainingHeads {
                predictions: LmPredictionHead {
                    transform: PredictionTransform {
                        dense: linear(h, h),
                        layer_norm: layer_norm(),
                    },
                    bias: burn::module::Param::from_tensor(Tensor::zeros(
                        [config.vocab_size],
                        device,
                    )),
                },
                seq_relationship: linear(h, 2),
            },
        }
    }

    /// Logits of the MLM head at the masked positions and of the NSP head.
    pub fn forward(&self, batch: &PretrainingBatch<B>) -> PretrainingOutput<B> {
        let [batch_size, seq_len] = batch.input_ids.dims();
        let hidden = self.bert.encode(
            batch.input_ids.clone(),
            batch.token_type_ids.clone(),
            batch.attention_mask.clone(),
        );
        let pooled = self
            .bert
            .pooler
            .forward(hidden.clone(), batch_size, seq_len);
        // Gather before the head: [masked, hidden] instead of [tokens, vocab] logits.
        let at_masks = hidden.select(0, batch.masked_positions.clone());
        let mlm_logits = self
            .cls
            .predictions
            .forward(at_masks, self.bert.embeddings.word_embeddings.weight.val());
        let nsp_logits = self.cls.seq_relationship.forward(pooled);
        PretrainingOutput {
            mlm_logits,
            nsp_logits,
        }
    }

    /// Cross-entropy losses of `output` against the labels in `batch`.
    pub fn loss(
        &self,
        output: &PretrainingOutput<B>,
        batch: &PretrainingBatch<B>,
    ) -> PretrainingLoss<B> {
        let batch_size = batch.next_sentence_labels.dims()[0] as f64;
        let mlm_nll =
            negative_log_likelihood(output.mlm_logits.clone(), batch.masked_lm_ids.clone());
        let mlm_loss = (mlm_nll * in_f32(batch.masked_lm_weights.clone())).sum() / batch_size;
        let nsp_nll = negative_log_likelihood(
            output.nsp_logits.clone(),
            batch.next_sentence_labels.clone(),
        );
        let nsp_loss = nsp_nll.mean();
        PretrainingLoss {
            loss: mlm_loss.clone() + nsp_loss.clone(),
            mlm_loss,
            nsp_loss,
        }
    }
}

/// `-log softmax(logits)[label]` per row, in f32 whatever the model computes in.
fn negative_log_likelihood<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let log_probs = log_softmax(in_f32(logits), 1);
    log_probs
        .gather(1, labels.unsqueeze_dim(1))
        .squeeze_dim::<1>(1)
        .neg()
}

/// `t` as f32 (itself when it already is). A bf16 model's losses are computed in f32: a
/// bf16 softmax over 30k logits keeps about two significant digits of the loss.
pub fn in_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        DType::F32 => t,
        _ => t.cast(FloatDType::F32),
    }
}

impl<B: Backend> BertModel<B> {
    /// Final hidden states as `[batch * seq, hidden]`.
    pub fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch_size, seq_len] = input_ids.dims();
        let mut hidden = self.embeddings.forward(input_ids, token_type_ids);
        // [batch, 1, 1, seq]: 0 where attended, MASKED_SCORE on padding.
        let score_bias = (attention_mask.float().neg() + 1.0)
            .mul_scalar(MASKED_SCORE)
            .reshape([batch_size, 1, 1, seq_len]);
        for layer in &self.encoder.layer {
            hidden = layer.forward(hidden, score_bias.clone(), batch_size, seq_len);
        }
        hidden
    }
}

impl<B: Backend> Embeddings<B> {
    fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch_size, seq_len] = input_ids.dims();
        let device = input_ids.device();
        let positions =
            Tensor::<B, 1, Int>::arange(0..seq_len as i64, &device).reshape([1, seq_len]);
        let words = self.word_embeddings.forward(input_ids);
        let types = self.token_type_embeddings.forward(token_type_ids);
        let positions = self.position_embeddings.forward(positions);
        let hidden_size = words.dims()[2];
        let sum = words + types + positions;
        let normed = self.layer_norm.forward(sum);
        dropout::apply(&self.dropout, normed).reshape([batch_size * seq_len, hidden_size])
    }
}

impl<B: Backend> EncoderLayer<B> {
    fn forward(
        &self,
        hidden: Tensor<B, 2>,
        score_bias: Tensor<B, 4>,
        batch_size: usize,
        seq_len: usize,
    ) -> Tensor<B, 2> {
        let rows = [batch_size, seq_len];
        let context =
            self.attention
                .self_attention
                .forward(hidden.clone(), score_bias, batch_size, seq_len);
        let attended = self.attention.output.forward(context, hidden, rows);
        let expanded = gelu(dense(&self.intermediate.dense, attended.clone(), rows));
        self.output.forward(expanded, attended, rows)
    }
}

impl<B: Backend> SelfAttention<B> {
    fn forward(
        &self,
        hidden: Tensor<B, 2>,
        score_bias: Tensor<B, 4>,
        batch_size: usize,
        seq_len: usize,
    ) -> Tensor<B, 2> {
        let hidden_size = hidden.dims()[1];
        let head_dim = hidden_size / self.num_heads;
        // [tokens, hidden] -> [batch, heads, seq, head_dim]
        let heads = |x: Tensor<B, 2>| {
            x.reshape([batch_size, seq_len, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let rows = [batch_size, seq_len];
        let query = heads(dense(&self.query, hidden.clone(), rows));
        let key = heads(dense(&self.key, hidden.clone(), rows));
        let value = heads(dense(&self.value, hidden, rows));
        let scores = query
            .matmul(key.swap_dims(2, 3))
            .div_scalar((head_dim as f32).sqrt())
            + score_bias;
        let probs = dropout::apply(&self.dropout, softmax(scores, 3));
        probs
            .matmul(value)
            .swap_dims(1, 2)
            .reshape([batch_size * seq_len, hidden_size])
    }
}

impl<B: Backend> Output<B> {
    fn forward(&self, x: Tensor<B, 2>, residual: Tensor<B, 2>, rows: [usize; 2]) -> Tensor<B, 2> {
        let projected = dropout::apply(&self.dropout, dense(&self.dense, x, rows));
        per_sequence(projected + residual, rows, |x| self.layer_norm.forward(x))
    }
}

/// `f` applied to `x`, `[tokens, n]`, viewed as `rows` = `[batch, seq]` by `n`.
///
/// Why: burn reduces the gradient of a broadcast parameter (a bias, LayerNorm's gamma and
/// beta) one broadcast dimension at a time. Over `[tokens, n]` that is a single reduction
/// of all the tokens into n sums, which burn-cuda's reduce runs with little parallelism:
/// 2 to 3.5 ms each for 16k tokens on an H200, about half of a BERT-base training step.
/// Over `[batch, seq, n]` it is two reductions with many outputs each.
fn per_sequence<B: Backend>(
    x: Tensor<B, 2>,
    [batch, seq]: [usize; 2],
    f: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [tokens, n] = x.dims();
    let y = f(x.reshape([batch, seq, n]));
    let n = y.dims()[2];
    y.reshape([tokens, n])
}

/// `linear` on `[tokens, in]` whose tokens are `rows`: one 2D product (burn's `Linear` on a
/// 3D input would make a batched product and sum its weight gradient over the batch), then
/// the bias added per sequence (see [`per_sequence`]).
fn dense<B: Backend>(linear: &Linear<B>, x: Tensor<B, 2>, rows: [usize; 2]) -> Tensor<B, 2> {
    let product = x.matmul(linear.weight.val());
    match &linear.bias {
        Some(bias) => per_sequence(product, rows, |p| p + bias.val().unsqueeze::<3>()),
        None => product,
    }
}

impl<B: Backend> Pooler<B> {
    /// tanh(dense(hidden state of [CLS])) per sequence: `[batch, hidden]`.
    fn forward(&self, hidden: Tensor<B, 2>, batch_size: usize, seq_len: usize) -> Tensor<B, 2> {
        let hidden_size = hidden.dims()[1];
        let first = hidden
            .reshape([batch_size, seq_len, hidden_size])
            .narrow(1, 0, 1)
            .reshape([batch_size, hidden_size]);
        tanh(self.dense.forward(first))
    }
}

impl<B: Backend> LmPredictionHead<B> {
    /// `[masked, hidden]` -> `[masked, vocab]` through the tied decoder.
    fn forward(&self, at_masks: Tensor<B, 2>, word_embeddings: Tensor<B, 2>) -> Tensor<B, 2> {
        let transformed = self
            .transform
            .layer_norm
            .forward(gelu(self.transform.dense.forward(at_masks)));
        transformed.matmul(word_embeddings.transpose()) + self.bias.val().unsqueeze_dim(0)
    }
}
