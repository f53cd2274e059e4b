//! bertrain-dataprep: corpus -> WordPiece -> MLM/NSP instances -> Parquet shards + manifest.
//!
//! `bertrain vocab` trains a vocabulary, `bertrain dataprep` streams a corpus into shards
//! (see [`pipeline`] for windows, determinism and validation hold-out, [`instances`] for the
//! generator's semantics, and the `shards` module for the columns), `bertrain inspect` decodes
//! them and `bertrain synth-corpus` writes the project's synthetic corpus.

pub mod cli;
mod input;
mod inspect;
pub mod instances;
mod manifest;
mod options;
pub mod pipeline;
mod progress;
mod rng;
mod shards;
mod synth;
mod tasks;
mod vocab;
mod wordpiece;

pub use manifest::{MANIFEST_FILE, Manifest};
pub use options::DataprepOptions;
pub use pipeline::{DataprepConfig, DataprepReport};
pub use shards::{Instance, read_rows, row_group_rows};
pub use synth::{SynthOptions, synth_corpus, synth_corpus_regions, synth_corpus_with};
pub use vocab::{Casing, CasingSource, Vocab, bert_tokenizer};
pub use wordpiece::SentenceTokenizer;

/// Seeded RNG used by the generator, exposed so tests can drive [`instances`] directly.
pub use rng::Rng as SeededRng;
