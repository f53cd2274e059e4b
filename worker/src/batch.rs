//! Collation: instances from the shards -> one padded micro-batch and where its real
//! tokens are. Done on the host (in the loader thread), so that the training step only
//! uploads ready arrays.

use bertrain_dataprep::Instance;
use bertrain_model::{BertConfig, PretrainingBatch, Unpadding};
use burn::prelude::*;

/// A micro-batch in host memory, padded to its longest sequence (not to max_seq_len:
/// with BERT's short_seq_prob many sequences are shorter, and padding is wasted work).
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// `row * seq_len + position` of every prediction, row by row.
    pub masked_positions: Vec<i64>,
    pub masked_lm_ids: Vec<i64>,
    /// `1 / predictions in the row`: every sequence weighs the same in the MLM loss
    /// (see `bertrain_model::PretrainingLoss`).
    pub masked_lm_weights: Vec<f32>,
    pub next_sentence_labels: Vec<i64>,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
    /// The positions the unpadded encoder computes.
    pub unpadding: Unpadding,
    /// Index of the batch's first row in the step's global batch: what its dropout masks
    /// are keyed by (see `bertrain_model::seed_dropout`), so that a row is dropped alike
    /// whichever rank and micro-batch it falls in. 0 until the loader sets it.
    pub first_row: u64,
}

impl HostBatch {
    /// Pads `instances` into one batch. Every instance must have at least one prediction
    /// (dataprep guarantees it).
    pub fn collate(instances: &[Instance]) -> HostBatch {
        let rows = instances.len();
        let seq_len = instances
            .iter()
            .map(|i| i.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut batch = HostBatch {
            rows,
            seq_len,
            input_ids: vec![0; rows * seq_len],
            token_type_ids: vec![0; rows * seq_len],
            attention_mask: vec![0; rows * seq_len],
            masked_positions: Vec::new(),
            masked_lm_ids: Vec::new(),
            masked_lm_weights: Vec::new(),
            next_sentence_labels: Vec::with_capacity(rows),
            tokens: 0,
            // Made from the mask and the predictions once the rows are in.
            unpadding: Unpadding::default(),
            first_row: 0,
        };
        for (row, instance) in instances.iter().enumerate() {
            let base = row * seq_len;
            for (j, (&id, &tt)) in instance
                .input_ids
                .iter()
                .zip(&instance.token_type_ids)
                .enumerate()
            {
                batch.input_ids[base + j] = id as i64;
                batch.token_type_ids[base + j] = tt as i64;
                batch.attention_mask[base + j] = 1;
            }
            batch.tokens += instance.input_ids.len();
            let weight = 1.0 / instance.masked_lm_positions.len().max(1) as f32;
            for (&pos, &id) in instance
                .masked_lm_positions
                .iter()
                .zip(&instance.masked_lm_ids)
            {
                batch.masked_positions.push((base + pos as usize) as i64);
                batch.masked_lm_ids.push(id as i64);
                batch.masked_lm_weights.push(weight);
            }
            batch
                .next_sentence_labels
                .push(instance.next_sentence_label as i64);
        }
        batch.unpadding = Unpadding::new(
            &batch.attention_mask,
            [rows, seq_len],
            &batch.masked_positions,
        );
        batch
    }

    /// Model FLOPs of a training step on this batch (see
    /// [`BertConfig::train_flops_per_token`]): each row at its own length, padding excluded.
    pub fn training_flops(&self, config: &BertConfig) -> f64 {
        let mut predictions = vec![0; self.rows];
        for &p in &self.masked_positions {
            predictions[p as usize / self.seq_len] += 1;
        }
        let mask = self.attention_mask.chunks(self.seq_len.max(1));
        mask.zip(predictions)
            .map(|(row, predictions)| {
                let len = row.iter().filter(|&&m| m != 0).count();
                len as f64 * config.train_flops_per_token(len, predictions)
            })
            .sum()
    }

    /// Fraction of the positions attention sees (`rows x seq_len`) that are padding; the
    /// rest of the encoder computes the real tokens only.
    pub fn padding_fraction(&self) -> f64 {
        let total = self.rows * self.seq_len;
        if total == 0 {
            0.0
        } else {
            1.0 - self.tokens as f64 / total as f64
        }
    }

    pub fn to_device<B: Backend>(&self, device: &B::Device) -> PretrainingBatch<B> {
        let shape = [self.rows, self.seq_len];
        let int2 = |v: &Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), shape), device)
        };
        let int1 = |v: &Vec<i64>| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), device)
        };
        PretrainingBatch {
            input_ids: int2(&self.input_ids),
            token_type_ids: int2(&self.token_type_ids),
            attention_mask: int2(&self.attention_mask),
            masked_positions: int1(&self.masked_positions),
            masked_lm_ids: int1(&self.masked_lm_ids),
            masked_lm_weights: Tensor::from_data(
                TensorData::new(
                    self.masked_lm_weights.clone(),
                    [self.masked_lm_weights.len()],
                ),
                device,
            ),
            next_sentence_labels: int1(&self.next_sentence_labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_and_offsets_positions() {
        let a = Instance {
            input_ids: vec![101, 7, 102, 8, 102],
            token_type_ids: vec![0, 0, 0, 1, 1],
            masked_lm_positions: vec![1, 3],
            masked_lm_ids: vec![9, 10],
            next_sentence_label: 0,
        };
        let b = Instance {
            input_ids: vec![101, 5, 102],
            token_type_ids: vec![0, 0, 1],
            masked_lm_positions: vec![1],
            masked_lm_ids: vec![11],
            next_sentence_label: 1,
        };
        let batch = HostBatch::collate(&[a, b]);
        assert_eq!(batch.seq_len, 5);
        assert_eq!(batch.input_ids[5..], [101, 5, 102, 0, 0]);
        assert_eq!(batch.attention_mask[5..], [1, 1, 1, 0, 0]);
        assert_eq!(batch.masked_positions, vec![1, 3, 6]);
        assert_eq!(batch.masked_lm_weights, vec![0.5, 0.5, 1.0]);
        assert_eq!(batch.next_sentence_labels, vec![0, 1]);
        assert!((batch.padding_fraction() - 0.2).abs() < 1e-12);

        // Each row's FLOPs at its own length and predictions; the padding counts for nothing.
        let config = BertConfig::preset("tiny").unwrap();
        let expected =
            5.0 * config.train_flops_per_token(5, 2) + 3.0 * config.train_flops_per_token(3, 1);
        assert!((batch.training_flops(&config) / expected - 1.0).abs() < 1e-12);
    }
}
