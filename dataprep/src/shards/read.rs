//! Reading shards: the rows of a range, streamed by row group, each checked against the
//! schema.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, Int32Type};
use arrow_array::{ArrayRef, Int8Array, ListArray, RecordBatch};
use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{Instance, schema};

/// Number of rows in each row group of a shard, from its footer.
pub fn row_group_rows(shard: &Path) -> Result<Vec<u64>> {
    let file = File::open(shard).with_context(|| format!("opening shard {}", shard.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("reading Parquet footer of {}", shard.display()))?;
    Ok(builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows() as u64)
        .collect())
}

/// Streams rows `[start, end)` of one shard. Row groups entirely before `start` are skipped
/// through the footer metadata without being read, so resuming in the middle of a shard costs
/// at most one partial row group.
pub fn read_rows(
    shard: &Path,
    start: u64,
    end: u64,
) -> Result<impl Iterator<Item = Result<Instance>> + use<>> {
    // `use<>`: the iterator owns everything it needs and does not borrow `shard`.
    let file = File::open(shard).with_context(|| format!("opening shard {}", shard.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("reading Parquet footer of {}", shard.display()))?;
    check_schema(builder.schema(), shard)?;
    let total: u64 = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows() as u64)
        .sum();
    if start > end || end > total {
        bail!(
            "rows {start}..{end} requested from shard {} which has {total} rows",
            shard.display()
        );
    }
    let mut groups = Vec::new();
    let mut first_group_start = None;
    let mut at = 0u64;
    for (i, g) in builder.metadata().row_groups().iter().enumerate() {
        let n = g.num_rows() as u64;
        if at + n > start && at < end {
            groups.push(i);
            first_group_start.get_or_insert(at);
        }
        at += n;
    }
    let skip = start - first_group_start.unwrap_or(start);
    let reader = builder
        .with_row_groups(groups)
        .with_offset(skip as usize)
        .with_limit((end - start) as usize)
        .with_batch_size(1024)
        .build()
        .with_context(|| format!("reading shard {}", shard.display()))?;
    Ok(RowIter {
        reader,
        batch: None,
        row: 0,
        path: shard.to_path_buf(),
        failed: false,
    })
}

pub(super) fn check_schema(found: &Schema, shard: &Path) -> Result<()> {
    for expected in schema().fields() {
        let field = found.field_with_name(expected.name()).map_err(|_| {
            anyhow!(
                "shard {} has no column `{}`; it was not written by `bertrain dataprep`",
                shard.display(),
                expected.name()
            )
        })?;
        let same = match (field.data_type(), expected.data_type()) {
            (DataType::List(a), DataType::List(b)) => a.data_type() == b.data_type(),
            (a, b) => a == b,
        };
        if !same {
            bail!(
                "shard {} column `{}` has type {}, expected {}",
                shard.display(),
                expected.name(),
                field.data_type(),
                expected.data_type()
            );
        }
    }
    Ok(())
}

pub(super) struct Columns {
    input_ids: ListArray,
    token_type_ids: ListArray,
    positions: ListArray,
    masked_ids: ListArray,
    labels: Int8Array,
}

pub(super) struct RowIter {
    reader: ParquetRecordBatchReader,
    batch: Option<Columns>,
    row: usize,
    path: PathBuf,
    failed: bool,
}

impl RowIter {
    fn column(&self, batch: &RecordBatch, name: &str) -> Result<ArrayRef> {
        batch
            .column_by_name(name)
            .cloned()
            .ok_or_else(|| anyhow!("shard {} has no column `{name}`", self.path.display()))
    }

    fn load(&self, batch: RecordBatch) -> Result<Columns> {
        let list = |name: &str| -> Result<ListArray> {
            let col = self.column(&batch, name)?;
            col.as_list_opt::<i32>().cloned().ok_or_else(|| {
                anyhow!(
                    "shard {} column `{name}` is not a list",
                    self.path.display()
                )
            })
        };
        let labels = self.column(&batch, "next_sentence_label")?;
        Ok(Columns {
            input_ids: list("input_ids")?,
            token_type_ids: list("token_type_ids")?,
            positions: list("masked_lm_positions")?,
            masked_ids: list("masked_lm_ids")?,
            labels: labels
                .as_primitive_opt::<Int8Type>()
                .cloned()
                .ok_or_else(|| {
                    anyhow!(
                        "shard {} column `next_sentence_label` is not int8",
                        self.path.display()
                    )
                })?,
        })
    }
}

pub(super) fn i32_values(list: &ListArray, row: usize) -> Vec<u32> {
    let v = list.value(row);
    v.as_primitive::<Int32Type>()
        .values()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

impl Iterator for RowIter {
    type Item = Result<Instance>;

    fn next(&mut self) -> Option<Result<Instance>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(cols) = &self.batch
                && self.row < cols.labels.len()
            {
                let r = self.row;
                self.row += 1;
                let tt = cols.token_type_ids.value(r);
                return Some(Ok(Instance {
                    input_ids: i32_values(&cols.input_ids, r),
                    token_type_ids: tt
                        .as_primitive::<Int8Type>()
                        .values()
                        .iter()
                        .map(|&x| x as u8)
                        .collect(),
                    masked_lm_positions: i32_values(&cols.positions, r),
                    masked_lm_ids: i32_values(&cols.masked_ids, r),
                    next_sentence_label: cols.labels.value(r) as u8,
                }));
            }
            match self.reader.next()? {
                Ok(batch) => match self.load(batch) {
                    Ok(cols) => {
                        self.batch = Some(cols);
                        self.row = 0;
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                },
                Err(e) => {
                    self.failed = true;
                    return Some(Err(anyhow::Error::new(e)
                        .context(format!("reading shard {}", self.path.display()))));
                }
            }
        }
    }
}
