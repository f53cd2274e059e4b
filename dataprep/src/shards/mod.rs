//! Parquet shards: the on-disk form of instances, and streaming reads of row ranges.
//!
//! Columns (one row per instance):
//! - `input_ids` list<int32>: `[CLS] A [SEP] B [SEP]`, unpadded, with masked positions
//!   already replaced (by [MASK], a random token or themselves).
//! - `token_type_ids` list<int8>: 0 for `[CLS] A [SEP]`, 1 for `B [SEP]`.
//! - `masked_lm_positions` list<int32>: ascending positions chosen for prediction.
//! - `masked_lm_ids` list<int32>: the original token at each of those positions.
//! - `next_sentence_label` int8: 0 = IsNext, 1 = NotNext (the HF convention).
//!
//! Files are zstd-compressed with row groups of a few thousand rows so a reader can seek to a
//! row by skipping whole row groups through the footer metadata.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

mod read;
mod write;

pub use read::{read_rows, row_group_rows};
pub(crate) use write::{RowRef, RowSource, ShardWriter};

/// One training example as stored in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u8>,
    pub masked_lm_positions: Vec<u32>,
    pub masked_lm_ids: Vec<u32>,
    /// 0 = IsNext, 1 = NotNext.
    pub next_sentence_label: u8,
}

pub(crate) fn schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, false)));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", list(DataType::Int32), false),
        Field::new("token_type_ids", list(DataType::Int8), false),
        Field::new("masked_lm_positions", list(DataType::Int32), false),
        Field::new("masked_lm_ids", list(DataType::Int32), false),
        Field::new("next_sentence_label", DataType::Int8, false),
    ]))
}
