//! BERT for pretraining (and fine-tuning) in burn, with Hugging Face compatible weights.
//!
//! - [`config`]: the model's shape (`BertConfig`, HF field names, presets).
//! - [`bert`]: the model itself, forward pass and losses, in one file.
//! - [`classifier`]: the encoder with a classification or regression head (fine-tuning).
//! - [`dense`]: the dense layer as one op with its own backward (the seam for cuBLASLt).
//! - [`fused`]: residual + LayerNorm and the AdamW step as ops a GPU runs as one kernel each.
//! - [`dropout`]: dropout with masks keyed by what each row is (host-drawn on CPU backends).
//! - `fixtures` (tests, and the `wgpu` feature's kernel tests): values, a small BERT, a padded batch.
//! - [`init`]: BERT's initialisation, deterministic from a seed.
//! - [`params`]: parameters as named flat buffers (checkpoints, all-reduce, optimizer).
//! - [`hf`]: HF directories (`config.json`, `model.safetensors`, `vocab.txt`).
//!
//! This crate knows nothing of data files or networks.

pub mod bert;
pub mod classifier;
pub mod config;
pub mod dense;
pub mod dropout;
#[cfg(any(test, feature = "wgpu"))]
pub mod fixtures;
pub mod fused;
pub mod hf;
pub mod init;
pub mod params;

pub use bert::{
    BertForPreTraining, PretrainingBatch, PretrainingLoss, PretrainingOutput, Unpadding, in_f32,
};
pub use classifier::{BertForSequenceClassification, ClassificationBatch, Targets};
pub use config::BertConfig;
pub use dense::{DenseOps, TrainingBackend};
pub use dropout::seed_dropout;
pub use init::init_bert;
pub use params::{
    Accumulation, ParamLayout, ParamSlot, accumulate_grads, flatten_params, load_flat_params,
};
