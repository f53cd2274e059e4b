//! The options that decide what instances are made and how they are stored: the flags of
//! `bertrain dataprep`, with their defaults here and nowhere else. The CLI flattens this
//! struct, the library takes it inside [`crate::DataprepConfig`], and the generator reads
//! it directly.

use anyhow::{Result, bail};
use clap::{Args, Parser};

/// Every option that changes the bytes of the shards (with the vocabulary, the casing and
/// the window size, which the caller decides).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct DataprepOptions {
    /// Tokens per instance, [CLS] and [SEP]s included.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Most masked positions per instance.
    #[arg(long, default_value_t = 20)]
    pub max_predictions: usize,
    #[arg(long, default_value_t = 0.15)]
    pub masked_lm_prob: f64,
    /// Fraction of instances made shorter than `max_seq_len` on purpose, as BERT's
    /// generator does, so the model also sees short inputs.
    #[arg(long, default_value_t = 0.1)]
    pub short_seq_prob: f64,
    /// Passes over the corpus, each with fresh segmentation and masking.
    #[arg(long, default_value_t = 5)]
    pub dupe_factor: usize,
    /// Mask all WordPiece pieces of a word together.
    #[arg(long)]
    pub whole_word_mask: bool,
    #[arg(long, default_value_t = 12345)]
    pub seed: u64,
    /// Rows per shard file.
    #[arg(long, default_value_t = 100_000)]
    pub shard_rows: usize,
    /// Rows per Parquet row group (the unit a reader can skip to). Each pending row group
    /// holds its rows and its encoders until written, so this sets most of dataprep's peak
    /// memory (README, dataprep figures).
    #[arg(long, default_value_t = 1024)]
    pub row_group_rows: usize,
    /// Fraction of documents held out (whole) into OUTPUT/validation/.
    #[arg(long, default_value_t = 0.0)]
    pub validation_fraction: f64,
}

impl Default for DataprepOptions {
    /// The flags' defaults, read from the flags themselves so they cannot drift apart.
    fn default() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            options: DataprepOptions,
        }
        Defaults::parse_from(["dataprep"]).options
    }
}

impl DataprepOptions {
    /// Fails with one line naming the flag when a value cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.max_seq_len < 8 {
            bail!(
                "--max-seq-len {} is too small; it must be at least 8",
                self.max_seq_len
            );
        }
        if self.max_seq_len > 1 << 20 {
            bail!("--max-seq-len {} is too large", self.max_seq_len);
        }
        if self.max_predictions == 0 {
            bail!("--max-predictions must be at least 1");
        }
        if !(self.masked_lm_prob > 0.0 && self.masked_lm_prob <= 1.0) {
            bail!("--masked-lm-prob {} must be in (0, 1]", self.masked_lm_prob);
        }
        if !(0.0..=1.0).contains(&self.short_seq_prob) {
            bail!("--short-seq-prob {} must be in [0, 1]", self.short_seq_prob);
        }
        if self.dupe_factor == 0 {
            bail!("--dupe-factor must be at least 1");
        }
        if self.shard_rows == 0 || self.row_group_rows == 0 {
            bail!("--shard-rows and --row-group-rows must be at least 1");
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            bail!(
                "--validation-fraction {} must be in [0, 1)",
                self.validation_fraction
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_papers_and_pass_validation() {
        let d = DataprepOptions::default();
        assert_eq!(
            (d.max_seq_len, d.max_predictions, d.dupe_factor),
            (128, 20, 5)
        );
        assert_eq!((d.masked_lm_prob, d.short_seq_prob), (0.15, 0.1));
        d.validate().unwrap();
    }

    #[test]
    fn a_value_that_cannot_work_is_refused_naming_its_flag() {
        let bad = DataprepOptions {
            masked_lm_prob: 0.0,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("--masked-lm-prob 0"), "{e}");
    }
}
