//! Examples to model inputs: tokenisation with the model's vocabulary and casing (as
//! dataprep decides it), `[CLS] A [SEP] (B [SEP])` with HF's truncation, and padded
//! batches.

use anyhow::{Context, Result};
use bertrain_dataprep::{SentenceTokenizer, Vocab};
use bertrain_model::{ClassificationBatch, Targets, Unpadding};
use burn::prelude::*;

use crate::input::{RawExample, Target};

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Feature {
    pub ids: Vec<u32>,
    /// Segment of each token: 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`.
    pub types: Vec<u8>,
    pub target: Target,
}

pub(crate) struct Tokenizer {
    words: SentenceTokenizer,
    cls: u32,
    sep: u32,
}

impl Tokenizer {
    pub(crate) fn new(vocab: &Vocab) -> Result<Tokenizer> {
        Ok(Tokenizer {
            words: SentenceTokenizer::new(vocab)?,
            cls: vocab.cls,
            sep: vocab.sep,
        })
    }

    pub(crate) fn features(
        &self,
        raw: &[RawExample],
        targets: &[Target],
        max_len: usize,
    ) -> Result<Vec<Feature>> {
        raw.iter()
            .zip(targets)
            .map(|(e, &target)| {
                let (ids, types) = self.encode(&e.a, e.b.as_deref(), max_len)?;
                Ok(Feature { ids, types, target })
            })
            .collect()
    }

    /// `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, at most `max_len` tokens. A pair is
    /// truncated one token at a time from the end of the longer text (B when they are
    /// equal), as HF tokenizers' `longest_first`.
    fn encode(&self, a: &str, b: Option<&str>, max_len: usize) -> Result<(Vec<u32>, Vec<u8>)> {
        let words = |text: &str| -> Result<Vec<u32>> {
            let mut out = Vec::new();
            self.words
                .encode(text, &mut out)
                .with_context(|| format!("tokenising {text:?}"))?;
            Ok(out)
        };
        let mut first = words(a)?;
        let mut second = b.map(words).transpose()?;
        let specials = if second.is_some() { 3 } else { 2 };
        let budget = max_len.saturating_sub(specials);
        match &mut second {
            None => first.truncate(budget),
            Some(second) => {
                while first.len() + second.len() > budget {
                    if first.len() > second.len() {
                        first.pop();
                    } else {
                        second.pop();
                    }
                }
            }
        }
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.cls);
        ids.extend(&first);
        ids.push(self.sep);
        let mut types = vec![0u8; ids.len()];
        if let Some(second) = second {
            ids.extend(&second);
            ids.push(self.sep);
            types.resize(ids.len(), 1);
        }
        Ok((ids, types))
    }
}

/// A batch on a device, the host's unpadding of it, and its real tokens.
pub(crate) struct Batch<B: Backend> {
    pub inputs: ClassificationBatch<B>,
    pub unpadding: Unpadding,
    pub targets: Targets<B>,
    pub tokens: usize,
}

/// `features` padded to the longest of them.
pub(crate) fn batch<B: Backend>(features: &[&Feature], device: &B::Device) -> Batch<B> {
    let rows = features.len();
    let seq = features.iter().map(|f| f.ids.len()).max().unwrap_or(1);
    let mut ids = vec![0i64; rows * seq];
    let mut types = vec![0i64; rows * seq];
    let mut mask = vec![0i64; rows * seq];
    for (r, f) in features.iter().enumerate() {
        for (p, (&id, &t)) in f.ids.iter().zip(&f.types).enumerate() {
            ids[r * seq + p] = i64::from(id);
            types[r * seq + p] = i64::from(t);
            mask[r * seq + p] = 1;
        }
    }
    let tokens = features.iter().map(|f| f.ids.len()).sum();
    let unpadding = Unpadding::new(&mask, [rows, seq], &[]);
    let ints =
        |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows, seq]), device);
    let targets = match features.first().map(|f| f.target) {
        Some(Target::Value(_)) => Targets::Values(Tensor::from_data(
            TensorData::new(
                features
                    .iter()
                    .map(|f| match f.target {
                        Target::Value(v) => v,
                        Target::Class(c) => c as f32,
                    })
                    .collect::<Vec<f32>>(),
                [rows],
            ),
            device,
        )),
        _ => Targets::Classes(Tensor::from_data(
            TensorData::new(
                features
                    .iter()
                    .map(|f| match f.target {
                        Target::Class(c) => c as i64,
                        Target::Value(v) => v as i64,
                    })
                    .collect::<Vec<i64>>(),
                [rows],
            ),
            device,
        )),
    };
    Batch {
        inputs: ClassificationBatch {
            input_ids: ints(ids),
            token_type_ids: ints(types),
            attention_mask: ints(mask),
        },
        unpadding,
        targets,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        let tokens = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e",
        ];
        std::fs::write(&path, tokens.join("\n") + "\n").unwrap();
        Tokenizer::new(&Vocab::load(&path, Some(true)).unwrap()).unwrap()
    }

    #[test]
    fn pairs_are_cls_a_sep_b_sep_truncated_from_the_longer() {
        let t = tokenizer();
        let (ids, types) = t.encode("a b", Some("c"), 16).unwrap();
        assert_eq!(ids, vec![2, 5, 6, 3, 7, 3]);
        assert_eq!(types, vec![0, 0, 0, 0, 1, 1]);
        // Budget 8 - 3 = 5 for A (4 words) + B (3 words): A loses one, then B... until 5.
        let (ids, _) = t.encode("A B C D", Some("e e e"), 8).unwrap();
        assert_eq!(ids, vec![2, 5, 6, 7, 3, 9, 9, 3]);
        let (ids, types) = t.encode("a b c d e", None, 4).unwrap();
        assert_eq!((ids, types), (vec![2, 5, 6, 3], vec![0; 4]));
    }
}
