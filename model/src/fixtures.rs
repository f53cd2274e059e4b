//! Deterministic values, a small BERT and a padded batch for tests of the model's code paths: this crate's unit
//! tests and the kernel tests on burn-wgpu (`tests/cube_kernels.rs`).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::{BertConfig, PretrainingBatch, Unpadding};

/// `len` deterministic pseudo-random values in [-scale, scale) (xorshift).
pub fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The largest absolute difference between two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tiny preset with a vocabulary of 120, 16 positions and the given dropout.
pub fn small_config(dropout: f64) -> BertConfig {
    BertConfig {
        vocab_size: 120,
        max_position_embeddings: 16,
        hidden_dropout_prob: dropout,
        attention_probs_dropout_prob: dropout,
        ..BertConfig::preset("tiny").unwrap()
    }
}

/// Four rows of lengths 5, 12, 9 and 12 padded to 12, with predictions in every row.
pub fn padded_batch<B: Backend>(device: &B::Device) -> (PretrainingBatch<B>, Unpadding) {
    let (rows, seq) = (4, 12);
    let lengths = [5, 12, 9, 12];
    let mut ids = vec![0i64; rows * seq];
    let mut types = vec![0i64; rows * seq];
    let mut mask = vec![0i64; rows * seq];
    for (row, &len) in lengths.iter().enumerate() {
        for p in 0..len {
            ids[row * seq + p] = 5 + ((row * 37 + p * 11) % 110) as i64;
            types[row * seq + p] = i64::from(p >= len / 2);
            mask[row * seq + p] = 1;
        }
    }
    let masked: Vec<i64> = vec![1, 3, 12 + 2, 12 + 11, 24 + 8, 36 + 4, 36 + 5];
    let m = masked.len();
    let ints2 = |v: &Vec<i64>| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), [rows, seq]), device)
    };
    let ints1 = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
    };
    let batch = PretrainingBatch {
        input_ids: ints2(&ids),
        token_type_ids: ints2(&types),
        attention_mask: ints2(&mask),
        masked_lm_ids: ints1(masked.iter().map(|&p| ids[p as usize]).collect()),
        masked_positions: ints1(masked.clone()),
        masked_lm_weights: Tensor::from_data(TensorData::new(vec![0.5f32; m], [m]), device),
        next_sentence_labels: ints1(vec![0, 1, 1, 0]),
    };
    let unpadding = Unpadding::new(&mask, [rows, seq], &masked);
    (batch, unpadding)
}
