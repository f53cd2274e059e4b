//! BERT for pretraining, in one file: embeddings, post-LN encoder, pooler, MLM and NSP
//! heads. Module and field names follow Hugging Face's `BertForPreTraining`
//! (`bert.encoder.layer.3.attention.self.query`) so that [`crate::hf`] maps parameters by
//! a few renames; the only structural differences are that burn stores a linear layer's
//! weight as `[in, out]` (HF: `[out, in]`) and LayerNorm's as `gamma`/`beta`.
//!
//! Activations between layers are kept as `[tokens, hidden]` matrices so that every dense
//! layer is one plain matmul. Training computes only the real tokens of a padded batch
//! (`forward_unpadded`, the rows an [`Unpadding`] names): only attention looks at the
//! padded `[batch, heads, seq, head_dim]` view, gathered from those rows and back.
//! `forward_padded` and `BertModel::encode` compute every position, padding included, as
//! HF transformers does; the two agree within float rounding, and dropout draws the same
//! masks in both (see [`crate::dropout`]).

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax, tanh};
use burn::tensor::{DType, FloatDType, TensorData};

use crate::config::BertConfig;
use crate::dense::{Activation, DenseOps};
use crate::dropout::{self, RowKeys};

/// The activation of the intermediate layer and the MLM transform: [`BertConfig`] accepts
/// only `hidden_act = "gelu"`, the erf form.
const HIDDEN_ACT: Activation = Activation::GeluErf;

/// Added to the attention scores of padding positions. Large enough that softmax gives
/// them exactly zero weight in fp32 and bf16; not `-inf`, so that a fully padded row
/// (which never occurs: [CLS] is always present) could not produce NaN.
const MASKED_SCORE: f32 = -1.0e9;

/// On a GPU the MLM decoder's product runs over the vocabulary rounded up to a multiple of
/// this (see [`padded_vocab`]).
const VOCAB_MULTIPLE: usize = 64;

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
    /// `layer_norm`'s ε, for the fused op (burn's `LayerNorm` keeps its own private).
    pub layer_norm_eps: f64,
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
    /// As [`Embeddings::layer_norm_eps`].
    pub layer_norm_eps: f64,
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
        let layer_norm = LayerNormConfig::new(h)
            .with_epsilon(config.layer_norm_eps)
            .init(device);
        BertForPreTraining {
            bert: BertModel::new(config, device),
            cls: PreTrainingHeads {
                predictions: LmPredictionHead {
                    transform: PredictionTransform {
                        dense: LinearConfig::new(h, h).init(device),
                        layer_norm,
                    },
                    bias: burn::module::Param::from_tensor(Tensor::zeros(
                        [config.vocab_size],
                        device,
                    )),
                },
                seq_relationship: LinearConfig::new(h, 2).init(device),
            },
        }
    }
}

impl<B: DenseOps> BertForPreTraining<B> {
    /// Logits of the MLM head at the masked positions and of the NSP head, from the
    /// unpadded encoder ([`BertForPreTraining::forward_unpadded`]). Where the padding is is
    /// read back from `batch`; the trainer passes an [`Unpadding`] made on the host instead,
    /// so that a GPU step never waits for that read.
    pub fn forward(&self, batch: &PretrainingBatch<B>) -> PretrainingOutput<B> {
        self.forward_unpadded(batch, &Unpadding::of(batch))
    }

    /// The same logits as [`BertForPreTraining::forward_padded`] (within float rounding),
    /// with the encoder computing only the positions `unpadding` keeps: embeddings, every
    /// dense layer, LayerNorm, GELU and dropout run on a `[tokens, hidden]` matrix of the
    /// real tokens, and only attention sees the padded `[batch, heads, seq, seq]` view.
    pub fn forward_unpadded(
        &self,
        batch: &PretrainingBatch<B>,
        unpadding: &Unpadding,
    ) -> PretrainingOutput<B> {
        let device = batch.input_ids.device();
        self.forward_placed(
            batch,
            unpadding,
            unpadding.place(&device, row_group::<B>(&device)),
        )
    }

    fn forward_placed(
        &self,
        batch: &PretrainingBatch<B>,
        unpadding: &Unpadding,
        placed: Placed<B>,
    ) -> PretrainingOutput<B> {
        let (hidden, cls, masked) = self.bert.encode_placed(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            unpadding,
            placed,
        );
        self.heads(hidden, cls, masked)
    }

    /// The logits with the encoder computing every position of the padded batch, padding
    /// included, as HF transformers does: the reference [`BertForPreTraining::forward`] is
    /// compared with.
    pub fn forward_padded(&self, batch: &PretrainingBatch<B>) -> PretrainingOutput<B> {
        let [batch_size, seq_len] = batch.input_ids.dims();
        let device = batch.input_ids.device();
        let hidden = self.bert.encode(
            batch.input_ids.clone(),
            batch.token_type_ids.clone(),
            batch.attention_mask.clone(),
        );
        let cls = (0..batch_size).map(|row| (row * seq_len) as i64).collect();
        let masked = batch.masked_positions.clone();
        let masked_count = masked.dims()[0];
        self.heads(
            hidden,
            index_column(cls, &device),
            masked.reshape([masked_count, 1]),
        )
    }

    /// Both heads on the final hidden states: NSP on the rows `cls` (`[batch, 1]`), MLM on
    /// the rows `masked` (`[masked, 1]`).
    fn heads(
        &self,
        hidden: Tensor<B, 2>,
        cls: Tensor<B, 2, Int>,
        masked: Tensor<B, 2, Int>,
    ) -> PretrainingOutput<B> {
        // gather_nd, not select: its gradient is a scatter with one thread per element on a
        // GPU, where select's loops over the rows (the indices are distinct, so no two
        // threads add into one element).
        let pooled = self
            .bert
            .pooler
            .forward(hidden.clone().gather_nd::<2, 2>(cls));
        // Gather before the head: [masked, hidden] instead of [tokens, vocab] logits.
        let at_masks = hidden.gather_nd::<2, 2>(masked);
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

/// Where a padded batch's real tokens are: what [`BertForPreTraining::forward_unpadded`]
/// needs besides the batch. Made on the host (for training, by the loader thread), so
/// that nothing has to be read back from the device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unpadding {
    rows: usize,
    seq: usize,
    /// Flat positions (`row * seq + position`) the encoder computes, ascending: the real
    /// tokens, and each row's first position and masked positions even where the mask says
    /// padding (the heads read them, and must read what the padded encoder gives them).
    kept: Vec<u32>,
    /// Flat positions of the predictions, as in the batch.
    masked: Vec<u32>,
}

/// Rows of the unpadded hidden matrix on a GPU come in a multiple of this (see
/// [`per_sequence`]); a few padding positions are computed to make it up.
pub(crate) const GPU_ROW_GROUP: usize = 64;

/// An [`Unpadding`] as tensors on one device.
struct Placed<B: Backend> {
    /// `[tokens, 1]` the flat padded position of each row of the hidden matrix.
    gather_positions: Tensor<B, 2, Int>,
    /// `[batch * seq, 1]` the row of the hidden matrix at each padded position.
    padded_from: Tensor<B, 2, Int>,
    /// `[tokens]` each row's position in its sequence.
    position_ids: Tensor<B, 1, Int>,
    /// `[batch, 1]` and `[masked, 1]`: the rows of the [CLS] tokens and of the predictions.
    cls: Tensor<B, 2, Int>,
    masked: Tensor<B, 2, Int>,
    /// Dropout keys of the rows (see [`dropout`]): their positions in the batch.
    keys: RowKeys<B>,
    /// The rows as `[groups, per group]` (see [`per_sequence`]).
    view: [usize; 2],
}

impl Unpadding {
    /// The unpadding of a `[rows, seq]` batch with `attention_mask` (1 = token) and its
    /// predictions at `masked_positions` (`row * seq + position`), all row-major.
    pub fn new(attention_mask: &[i64], [rows, seq]: [usize; 2], masked_positions: &[i64]) -> Self {
        assert_eq!(
            attention_mask.len(),
            rows * seq,
            "attention_mask is [rows, seq]"
        );
        let mut keep: Vec<bool> = attention_mask.iter().map(|&m| m != 0).collect();
        for row in 0..rows {
            keep[row * seq] = true;
        }
        for &p in masked_positions {
            keep[p as usize] = true;
        }
        Unpadding {
            rows,
            seq,
            kept: (0..rows * seq)
                .filter(|&p| keep[p])
                .map(|p| p as u32)
                .collect(),
            masked: masked_positions.iter().map(|&p| p as u32).collect(),
        }
    }

    /// The unpadding of a batch already on the device (reads its mask back).
    pub fn of<B: Backend>(batch: &PretrainingBatch<B>) -> Self {
        let ints = |t: &Tensor<B, 2, Int>| t.clone().into_data().iter::<i64>().collect::<Vec<_>>();
        let masked: Vec<i64> = batch
            .masked_positions
            .clone()
            .into_data()
            .iter::<i64>()
            .collect();
        Unpadding::new(
            &ints(&batch.attention_mask),
            batch.attention_mask.dims(),
            &masked,
        )
    }

    /// Positions the encoder computes (before [`GPU_ROW_GROUP`] rounding).
    pub fn tokens(&self) -> usize {
        self.kept.len()
    }

    /// The index tensors of this unpadding on `device`, for a hidden matrix whose rows come
    /// in multiples of `group` where there is padding to make them up.
    ///
    /// Padding positions are gathered from a row of their own (a computed padding
    /// position, the "spare") rather than from a zero row: the gradient of a GPU gather is
    /// a scatter without atomics, correct only where each element receives one addition,
    /// and every addition into the spare is an exact zero (nothing reads padding:
    /// attention gives it weight 0, and no head reads it). On a GPU, enough padding
    /// positions are computed to make the rows a multiple of [`GPU_ROW_GROUP`].
    fn place<B: Backend>(&self, device: &B::Device, group: usize) -> Placed<B> {
        let total = self.rows * self.seq;
        let mut rows = self.kept.clone();
        let mut spare = None;
        if rows.len() < total {
            let mut computed = vec![false; total];
            for &p in &self.kept {
                computed[p as usize] = true;
            }
            let extra = (group - (rows.len() + 1) % group) % group + 1;
            let padding = (0..total as u32).filter(|&p| !computed[p as usize]);
            let first = rows.len();
            rows.extend(padding.take(extra));
            spare = Some(rows[first]);
            rows.sort_unstable();
        }
        let tokens = rows.len();
        const NOT_COMPUTED: u32 = u32::MAX;
        let mut row_of = vec![NOT_COMPUTED; total];
        for (i, &p) in rows.iter().enumerate() {
            row_of[p as usize] = i as u32;
        }
        let spare_row = spare.map_or(0, |p| row_of[p as usize]);
        let padded_from = row_of
            .iter()
            .map(|&r| i64::from(if r == NOT_COMPUTED { spare_row } else { r }))
            .collect();
        let seq = self.seq as u32;
        let positions: Vec<i64> = rows.iter().map(|&p| i64::from(p)).collect();
        let ints1 = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        let row_indices = |flat: &mut dyn Iterator<Item = u32>| {
            index_column(
                flat.map(|p| i64::from(row_of[p as usize])).collect(),
                device,
            )
        };
        let gather_positions = index_column(positions, device);
        let keys = RowKeys::listed(
            dropout::first_sequence(),
            self.seq,
            &rows,
            gather_positions.clone().reshape([tokens]),
        );
        Placed {
            gather_positions,
            padded_from: index_column(padded_from, device),
            position_ids: ints1(rows.iter().map(|&p| i64::from(p % seq)).collect()),
            cls: row_indices(&mut (0..self.rows as u32).map(|r| r * seq)),
            masked: row_indices(&mut self.masked.iter().copied()),
            keys,
            view: if tokens.is_multiple_of(group) {
                [tokens / group, group]
            } else {
                [tokens, 1]
            },
        }
    }
}

/// `values` as a `[n, 1]` index tensor for `gather_nd` along the first dimension.
fn index_column<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n, 1]), device)
}

/// How the rows of the hidden matrix lie in the padded batch.
struct Rows<B: Backend> {
    batch: usize,
    seq: usize,
    /// The rows as `[groups, per group]` for biases and LayerNorm (see [`per_sequence`]).
    view: [usize; 2],
    /// For the unpadded encoder: gather indices from the hidden rows to the padded layout
    /// (`[batch * seq, 1]`) and back (`[tokens, 1]`). None: the rows are the padded batch.
    unpad: Option<(Tensor<B, 2, Int>, Tensor<B, 2, Int>)>,
    /// Dropout keys of the hidden rows and of the attention probabilities' rows.
    keys: RowKeys<B>,
    attention_keys: RowKeys<B>,
}

impl<B: DenseOps> BertModel<B> {
    /// Final hidden states as `[batch * seq, hidden]`, padding positions included: the
    /// padded encoder, as HF transformers computes it.
    pub fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let rows = Rows {
            batch,
            seq,
            view: [batch, seq],
            unpad: None,
            keys: RowKeys::grid(dropout::first_sequence(), seq),
            attention_keys: self.attention_keys(seq),
        };
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        self.encode_rows(input_ids, token_type_ids, positions, &attention_mask, &rows)
    }

    /// The encoder on the rows `rows` describes, whose word, segment and position ids are
    /// given in its `view` (positions may broadcast over the first dimension).
    fn encode_rows(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        attention_mask: &Tensor<B, 2, Int>,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let mut hidden = self
            .embeddings
            .forward(input_ids, token_type_ids, position_ids, rows);
        // [batch, 1, 1, seq]: 0 where attended, MASKED_SCORE on padding.
        let score_bias = (attention_mask.clone().float().neg() + 1.0)
            .mul_scalar(MASKED_SCORE)
            .reshape([rows.batch, 1, 1, rows.seq]);
        for layer in &self.encoder.layer {
            hidden = layer.forward(hidden, score_bias.clone(), rows);
        }
        hidden
    }

    /// Dropout keys of the attention probabilities' rows, `[batch, heads, seq]`:
    /// `(sequence * heads + head) << 32 | query position`, the same in both encoders.
    fn attention_keys(&self, seq: usize) -> RowKeys<B> {
        let heads = self
            .encoder
            .layer
            .first()
            .map_or(1, |l| l.attention.self_attention.num_heads);
        RowKeys::grid(dropout::first_sequence() * heads as u64, seq)
    }
}

impl<B: Backend> BertModel<B> {
    /// The encoder and pooler of the given shape, with placeholder values (see
    /// [`BertForPreTraining::new`]).
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
            layer_norm_eps: config.layer_norm_eps,
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
        BertModel {
            embeddings: Embeddings {
                word_embeddings: embedding(config.vocab_size),
                position_embeddings: embedding(config.max_position_embeddings),
                token_type_embeddings: embedding(config.type_vocab_size),
                layer_norm: layer_norm(),
                layer_norm_eps: config.layer_norm_eps,
                dropout: hidden_dropout(),
            },
            encoder: Encoder { layer },
            pooler: Pooler {
                dense: linear(h, h),
            },
        }
    }
}

impl<B: DenseOps> BertModel<B> {
    /// The pooled output (`tanh(dense([CLS]))`, `[batch, hidden]`) of every row of a padded
    /// batch, from the unpadded encoder: what a sequence classifier reads.
    pub fn pooled(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        token_type_ids: &Tensor<B, 2, Int>,
        attention_mask: &Tensor<B, 2, Int>,
        unpadding: &Unpadding,
    ) -> Tensor<B, 2> {
        let device = input_ids.device();
        let placed = unpadding.place(&device, row_group::<B>(&device));
        let (hidden, cls, _) =
            self.encode_placed(input_ids, token_type_ids, attention_mask, unpadding, placed);
        self.pooler.forward(hidden.gather_nd::<2, 2>(cls))
    }

    /// The pooled output of every row with the encoder computing every position, padding
    /// included, as HF transformers does: the reference [`BertModel::pooled`] is compared
    /// with.
    pub fn pooled_padded(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let [batch_size, seq_len] = input_ids.dims();
        let device = input_ids.device();
        let hidden = self.encode(input_ids, token_type_ids, attention_mask);
        let cls = (0..batch_size).map(|row| (row * seq_len) as i64).collect();
        self.pooler
            .forward(hidden.gather_nd::<2, 2>(index_column(cls, &device)))
    }

    /// The unpadded encoder on the rows `placed` names: the final hidden states `[rows,
    /// hidden]`, and the rows of the [CLS] tokens (`[batch, 1]`) and of the predictions
    /// (`[masked, 1]`).
    fn encode_placed(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        token_type_ids: &Tensor<B, 2, Int>,
        attention_mask: &Tensor<B, 2, Int>,
        unpadding: &Unpadding,
        placed: Placed<B>,
    ) -> (Tensor<B, 2>, Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let [groups, per_group] = placed.view;
        let positions = placed
            .gather_positions
            .clone()
            .reshape([groups * per_group]);
        let ids = |padded: &Tensor<B, 2, Int>| {
            padded
                .clone()
                .reshape([unpadding.rows * unpadding.seq])
                .select(0, positions.clone())
                .reshape(placed.view)
        };
        let rows = Rows {
            batch: unpadding.rows,
            seq: unpadding.seq,
            view: placed.view,
            unpad: Some((placed.padded_from.clone(), placed.gather_positions.clone())),
            keys: placed.keys,
            attention_keys: self.attention_keys(unpadding.seq),
        };
        let hidden = self.encode_rows(
            ids(input_ids),
            ids(token_type_ids),
            placed.position_ids.reshape([groups, per_group]),
            attention_mask,
            &rows,
        );
        (hidden, placed.cls, placed.masked)
    }
}

/// How many rows the unpadded encoder's hidden matrix comes in multiples of on `device`
/// (see [`GPU_ROW_GROUP`]).
fn row_group<B: Backend>(device: &B::Device) -> usize {
    if dropout::computes_on_host::<B>(device) {
        1
    } else {
        GPU_ROW_GROUP
    }
}

impl<B: DenseOps> Embeddings<B> {
    /// `[rows, hidden]`: the sum of the three embeddings, normalised, with dropout.
    fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let words = self.word_embeddings.forward(input_ids);
        let types = self.token_type_embeddings.forward(token_type_ids);
        let positions = self.position_embeddings.forward(position_ids);
        let [groups, per_group, hidden_size] = words.dims();
        let flat = |t: Tensor<B, 3>| t.reshape([groups * per_group, hidden_size]);
        let normed = if B::fused_layer_norm(hidden_size) {
            add_layer_norm(
                &self.layer_norm,
                self.layer_norm_eps,
                flat(words + types),
                flat(positions),
                None,
            )
        } else {
            flat(self.layer_norm.forward(words + types + positions))
        };
        dropout::apply(&self.dropout, normed, &rows.keys)
    }
}

impl<B: DenseOps> EncoderLayer<B> {
    fn forward(
        &self,
        hidden: Tensor<B, 2>,
        score_bias: Tensor<B, 4>,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let context = self
            .attention
            .self_attention
            .forward(hidden.clone(), score_bias, rows);
        let attended = self.attention.output.forward(context, hidden, rows);
        let expanded = dense(&self.intermediate.dense, attended.clone(), HIDDEN_ACT);
        self.output.forward(expanded, attended, rows)
    }
}

impl<B: DenseOps> SelfAttention<B> {
    /// The attention context of every row: `[rows, hidden]`. Queries, keys and values are
    /// computed on the rows; the unpadded encoder then gathers them into the padded
    /// `[batch, heads, seq, head_dim]` view, and gathers the context back from it.
    fn forward(
        &self,
        hidden: Tensor<B, 2>,
        score_bias: Tensor<B, 4>,
        rows: &Rows<B>,
    ) -> Tensor<B, 2> {
        let hidden_size = hidden.dims()[1];
        let head_dim = hidden_size / self.num_heads;
        let (batch, seq) = (rows.batch, rows.seq);
        // Q, K and V as one product, [rows, 3 × hidden] (one larger matrix product, and
        // one gather into the padded view instead of three).
        let qkv = crate::dense::dense(
            hidden,
            Tensor::cat(
                vec![
                    self.query.weight.val(),
                    self.key.weight.val(),
                    self.value.weight.val(),
                ],
                1,
            ),
            Tensor::cat(
                vec![bias(&self.query), bias(&self.key), bias(&self.value)],
                0,
            ),
            Activation::Identity,
        );
        let padded = match &rows.unpad {
            Some((padded_from, _)) => qkv.gather_nd::<2, 2>(padded_from.clone()),
            None => qkv,
        };
        // [batch, seq, 3, heads, head_dim] -> three [batch, heads, seq, head_dim]
        let per_head = padded.reshape([batch, seq, 3, self.num_heads, head_dim]);
        let part = |i: usize| {
            per_head
                .clone()
                .narrow(2, i, 1)
                .reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let context = attention(
            part(0),
            part(1),
            part(2),
            score_bias,
            &self.dropout,
            &rows.attention_keys,
        );
        let context = context.swap_dims(1, 2).reshape([batch * seq, hidden_size]);
        match &rows.unpad {
            Some((_, positions)) => context.gather_nd::<2, 2>(positions.clone()),
            None => context,
        }
    }
}

/// Scaled dot-product attention on per-head `[batch, heads, seq, head_dim]` queries, keys
/// and values: `softmax(q kᵀ / √head_dim + score_bias)` (the backend's fused op where it
/// has one switched on) with dropout on the probabilities, times the values (both
/// products batched per head where the backend has that switched on). `score_bias` broadcasts (`[batch, 1, 1, seq]`: 0 where attended,
/// [`MASKED_SCORE`] on padding); `keys` name the probabilities' `batch * heads * seq` rows
/// for keyed dropout masks (see [`crate::dropout`]).
/// Public so that `bench step` can time attention alone at the model's shapes.
pub fn attention<B: DenseOps>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    score_bias: Tensor<B, 4>,
    dropout: &Dropout,
    keys: &RowKeys<B>,
) -> Tensor<B, 4> {
    let divisor = (query.dims()[3] as f32).sqrt();
    let scores = per_head_product(query, key, true);
    let dropped = if !B::fused_softmax() {
        let probs = softmax(scores.div_scalar(divisor) + score_bias, 3);
        dropout::apply(dropout, probs, keys)
    } else if let Some(mask) = dropout::kernel_mask(dropout, keys, &scores.device()) {
        crate::fused::softmax::attention_softmax_dropout(scores, score_bias, divisor, &mask)
    } else {
        let probs = crate::fused::softmax::attention_softmax(scores, score_bias, divisor);
        dropout::apply(dropout, probs, keys)
    };
    per_head_product(dropped, value, false)
}

/// `a · op(b)` for each (sequence, head) of `[batch, heads, rows, cols]` tensors: the
/// backend's batched product where it has one switched on, burn's `matmul` otherwise.
fn per_head_product<B: DenseOps>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    b_transposed: bool,
) -> Tensor<B, 4> {
    if !B::batched_products() {
        return a.matmul(if b_transposed { b.swap_dims(2, 3) } else { b });
    }
    let [batch, heads, rows, _] = a.dims();
    let [_, _, b_rows, b_cols] = b.dims();
    let cols = if b_transposed { b_rows } else { b_cols };
    let matrices = |t: Tensor<B, 4>| {
        let [batch, heads, rows, cols] = t.dims();
        t.reshape([batch * heads, rows, cols])
    };
    crate::dense::batched_matmul(matrices(a), false, matrices(b), b_transposed)
        .reshape([batch, heads, rows, cols])
}

impl<B: DenseOps> Output<B> {
    fn forward(&self, x: Tensor<B, 2>, residual: Tensor<B, 2>, rows: &Rows<B>) -> Tensor<B, 2> {
        let projected = dense(&self.dense, x, Activation::Identity);
        if B::fused_layer_norm(projected.dims()[1]) {
            // The dropout inside the op's kernels where the backend has them, else before it.
            let mask = dropout::kernel_mask(&self.dropout, &rows.keys, &projected.device());
            let projected = match mask {
                Some(_) => projected,
                None => dropout::apply(&self.dropout, projected, &rows.keys),
            };
            let (layer_norm, eps) = (&self.layer_norm, self.layer_norm_eps);
            return add_layer_norm(layer_norm, eps, projected, residual, mask.as_ref());
        }
        let projected = dropout::apply(&self.dropout, projected, &rows.keys);
        per_sequence(projected + residual, rows.view, |x| {
            self.layer_norm.forward(x)
        })
    }
}

/// `layer_norm(x ⊙ M + residual)` as the backend's fused op (`x + residual` without a
/// `mask`; see [`crate::fused::layer_norm`]).
fn add_layer_norm<B: DenseOps>(
    layer_norm: &LayerNorm<B>,
    epsilon: f64,
    x: Tensor<B, 2>,
    residual: Tensor<B, 2>,
    mask: Option<&dropout::KeyedMask<B>>,
) -> Tensor<B, 2> {
    let beta = layer_norm.beta.as_ref();
    let beta = beta.expect("every LayerNorm of BERT has a bias").val();
    let gamma = layer_norm.gamma.val();
    crate::fused::layer_norm::add_layer_norm(x, residual, gamma, beta, epsilon, mask)
}

/// `f` applied to `x`, `[rows, n]`, viewed as `view` = `[groups, per group]` by `n`.
///
/// Why: burn reduces the gradient of a broadcast parameter (LayerNorm's gamma and beta)
/// one broadcast dimension at a time. Over `[rows, n]` that is a single reduction
/// of all the rows into n sums, which burn-cuda's reduce runs with little parallelism:
/// 2 to 3.5 ms each for 16k tokens on an H200, about half of a BERT-base training step.
/// Over `[groups, per group, n]` it is two reductions with many outputs each. The padded
/// encoder's groups are its sequences; the unpadded one's are runs of [`GPU_ROW_GROUP`]
/// rows on a GPU. (The dense layers' bias gradients are summed the same way inside
/// [`crate::dense`].)
fn per_sequence<B: Backend>(
    x: Tensor<B, 2>,
    [groups, per_group]: [usize; 2],
    f: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [rows, n] = x.dims();
    let y = f(x.reshape([groups, per_group, n]));
    let n = y.dims()[2];
    y.reshape([rows, n])
}

/// `act(linear(x))` on `[rows, in]` as the backend's one dense op (see [`crate::dense`]).
fn dense<B: DenseOps>(linear: &Linear<B>, x: Tensor<B, 2>, act: Activation) -> Tensor<B, 2> {
    crate::dense::dense(x, linear.weight.val(), bias(linear), act)
}

fn bias<B: Backend>(linear: &Linear<B>) -> Tensor<B, 1> {
    let bias = linear.bias.as_ref();
    bias.expect("every dense layer of BERT has a bias").val()
}

impl<B: Backend> Pooler<B> {
    /// tanh(dense(hidden state of [CLS])) per sequence: `[batch, hidden]`.
    fn forward(&self, cls: Tensor<B, 2>) -> Tensor<B, 2> {
        tanh(self.dense.forward(cls))
    }
}

impl<B: DenseOps> LmPredictionHead<B> {
    /// `[masked, hidden]` -> `[masked, vocab]` through the tied decoder.
    fn forward(&self, at_masks: Tensor<B, 2>, word_embeddings: Tensor<B, 2>) -> Tensor<B, 2> {
        let transformed =
            self.transform
                .layer_norm
                .forward(dense(&self.transform.dense, at_masks, HIDDEN_ACT));
        let vocab = padded_vocab::<B>(word_embeddings.dims()[0], &transformed.device());
        tied_decoder(transformed, word_embeddings, self.bias.val(), vocab)
    }
}

/// The vocabulary size the MLM decoder's product runs over on `device`: `vocab` rounded up
/// to a multiple of [`VOCAB_MULTIPLE`] on a GPU, so that the product's output dimension
/// suits tensor cores (BERT's 30,522 is not a multiple of 8); `vocab` itself on the CPU,
/// where the padding would only add copies.
pub fn padded_vocab<B: Backend>(vocab: usize, device: &B::Device) -> usize {
    if dropout::computes_on_host::<B>(device) {
        vocab
    } else {
        vocab.next_multiple_of(VOCAB_MULTIPLE)
    }
}

/// `x · embeddingsᵀ + bias`, `[rows, vocab]`, as one dense op over `padded` ≥ vocab
/// columns (zero weights and biases beyond the vocabulary, cut off again): the padding is
/// internal, the parameters keep HF's shapes.
fn tied_decoder<B: DenseOps>(
    x: Tensor<B, 2>,
    embeddings: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    padded: usize,
) -> Tensor<B, 2> {
    let [vocab, hidden] = embeddings.dims();
    let (mut weight, mut bias) = (embeddings.transpose(), bias);
    if padded > vocab {
        let device = weight.device();
        let extra = padded - vocab;
        weight = Tensor::cat(vec![weight, Tensor::zeros([hidden, extra], &device)], 1);
        bias = Tensor::cat(vec![bias, Tensor::zeros([extra], &device)], 0);
    }
    crate::dense::dense(x, weight, bias, Activation::Identity).narrow(1, 0, vocab)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{max_diff, padded_batch as batch, small_config as config};
    use crate::params::{Accumulation, ParamLayout, accumulate_grads};
    use crate::{init_bert, seed_dropout};
    use burn::backend::{Autodiff, Flex};

    type Train = Autodiff<Flex>;

    /// Logits and the gradient of the loss for every parameter, flat.
    fn run(
        model: &BertForPreTraining<Train>,
        batch: &PretrainingBatch<Train>,
        forward: impl Fn() -> PretrainingOutput<Train>,
    ) -> (Vec<f32>, Vec<f32>) {
        seed_dropout(11, 0);
        let output = forward();
        let loss = model.loss(&output, batch).loss;
        let layout = ParamLayout::of(model);
        let mut grads = vec![0.0; layout.total + 1];
        accumulate_grads(
            model,
            &loss.backward(),
            &layout,
            &mut grads,
            Accumulation::Overwrite,
        );
        let mut logits: Vec<f32> = output.mlm_logits.into_data().to_vec().unwrap();
        logits.extend(output.nsp_logits.into_data().to_vec::<f32>().unwrap());
        (logits, grads)
    }

    /// The unpadded encoder is the padded one's function: the same logits and gradients
    /// within 1e-5, without dropout and with it (its masks are keyed by sequence and
    /// position), also when padding rows are computed to fill GPU row groups.
    #[test]
    fn unpadded_matches_padded_outputs_and_gradients() {
        let device = Default::default();
        for dropout in [0.0, 0.1] {
            let model = init_bert::<Train>(&config(dropout), 3, &device);
            let (batch, unpadding) = batch(&device);
            assert_eq!(unpadding.tokens(), 5 + 12 + 9 + 12);
            let padded = run(&model, &batch, || model.forward_padded(&batch));
            let unpadded = run(&model, &batch, || {
                model.forward_unpadded(&batch, &unpadding)
            });
            // Groups of 8 rows: 38 tokens + 2 padding rows (one of them the spare).
            let grouped = run(&model, &batch, || {
                let placed = unpadding.place(&device, 8);
                assert_eq!(placed.view, [5, 8]);
                model.forward_placed(&batch, &unpadding, placed)
            });
            assert!(padded.1.iter().any(|&g| g.abs() > 1e-3), "gradients flow");
            for (name, other) in [("unpadded", &unpadded), ("grouped", &grouped)] {
                let logits = max_diff(&padded.0, &other.0);
                let grads = max_diff(&padded.1, &other.1);
                assert!(
                    logits < 1e-5,
                    "dropout {dropout}, {name}: logits differ by {logits}"
                );
                assert!(
                    grads < 1e-5,
                    "dropout {dropout}, {name}: gradients differ by {grads}"
                );
            }
        }
    }

    /// The decoder over the padded vocabulary (as on a GPU) is the plain tied decoder: the
    /// same logits and the same gradients of the embeddings, the bias and the input.
    #[test]
    fn padded_decoder_is_the_plain_decoder() {
        let device = Default::default();
        let model = init_bert::<Train>(&config(0.0), 5, &device);
        let head = &model.cls.predictions;
        let vocab = model.bert.embeddings.word_embeddings.weight.dims()[0];
        let padded = vocab.next_multiple_of(VOCAB_MULTIPLE);
        assert!(padded > vocab, "the test exercises the padding");
        let at_masks = Tensor::<Train, 2>::random(
            [6, 128],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let upstream = Tensor::<Train, 2>::random(
            [6, vocab],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let plain = |x: Tensor<Train, 2>, embeddings: Tensor<Train, 2>| {
            let t = head
                .transform
                .layer_norm
                .forward(dense(&head.transform.dense, x, HIDDEN_ACT));
            t.matmul(embeddings.transpose()) + head.bias.val().unsqueeze_dim(0)
        };
        let gradients = |logits: Tensor<Train, 2>, x: &Tensor<Train, 2>, e: &Tensor<Train, 2>| {
            let grads = (logits.clone() * upstream.clone()).sum().backward();
            let values = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
            let mut all = values(logits.inner());
            all.extend(values(x.grad(&grads).unwrap()));
            all.extend(values(e.grad(&grads).unwrap()));
            all.extend(
                head.bias
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            );
            all
        };
        let embeddings = model.bert.embeddings.word_embeddings.weight.val();
        let (x1, e1) = (
            at_masks.clone().require_grad(),
            embeddings.clone().require_grad(),
        );
        let transformed =
            head.transform
                .layer_norm
                .forward(dense(&head.transform.dense, x1.clone(), HIDDEN_ACT));
        let logits = tied_decoder(transformed, e1.clone(), head.bias.val(), padded);
        let padded = gradients(logits, &x1, &e1);
        let (x2, e2) = (at_masks.require_grad(), embeddings.require_grad());
        let reference = gradients(plain(x2.clone(), e2.clone()), &x2, &e2);
        let diff = max_diff(&padded, &reference);
        assert!(diff < 1e-5, "differ by {diff}");
    }

    /// Padding positions read from a spare padding row, never from a real token; a batch
    /// without padding has no spare.
    #[test]
    fn placement_keeps_tokens_and_maps_padding_to_the_spare() {
        let device: burn::tensor::Device<Flex> = Default::default();
        let mask = [1, 1, 0, 0, 1, 1, 1, 0];
        let unpadding = Unpadding::new(&mask, [2, 4], &[1, 5]);
        let placed = unpadding.place::<Flex>(&device, 1);
        let ints = |t: Tensor<Flex, 2, Int>| t.into_data().iter::<i64>().collect::<Vec<_>>();
        // Tokens 0, 1, 4, 5, 6 and the spare, position 2.
        assert_eq!(ints(placed.gather_positions), vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(ints(placed.padded_from), vec![0, 1, 2, 2, 3, 4, 5, 2]);
        assert_eq!(ints(placed.cls), vec![0, 3]);
        assert_eq!(ints(placed.masked), vec![1, 4]);
        let full = Unpadding::new(&[1; 8], [2, 4], &[1]).place::<Flex>(&device, 1);
        assert_eq!(ints(full.padded_from), (0..8).collect::<Vec<_>>());
    }
}
