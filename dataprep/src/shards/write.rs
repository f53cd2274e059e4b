//! Writing shards: rows gathered into row groups, encoded and compressed by pool tasks,
//! appended in order to a file under a temporary name, renamed once complete.

use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{ArrayRef, Int8Array, Int32Array, ListArray, RecordBatch};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnChunk, ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesPtr};
use parquet::file::writer::SerializedFileWriter;
use sha2::{Digest, Sha256};

use bertrain_files::{hex, sync_dir, temp_name};

use crate::manifest::ShardEntry;
use crate::tasks::InOrder;

use super::schema;

/// One row as the generator holds it: `input_ids`, the length of `[CLS] A [SEP]` (token type
/// 0), `masked_lm_positions`, `masked_lm_ids`, `next_sentence_label`.
pub(crate) type RowRef<'a> = (&'a [u32], u32, &'a [u32], &'a [u32], u8);

/// Column-major buffers for up to one row group.
#[derive(Default)]
pub(crate) struct RowBuffer {
    input_ids: Vec<i32>,
    input_offsets: Vec<i32>,
    token_type_ids: Vec<i8>,
    positions: Vec<i32>,
    masked_ids: Vec<i32>,
    mask_offsets: Vec<i32>,
    labels: Vec<i8>,
}

impl RowBuffer {
    fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Empty, with room for exactly `rows`: one allocation per column rather than a series of
    /// doublings, whose freed sizes would stay behind in the allocator (see `GROWING_BATCH` in
    /// the pipeline).
    fn with_capacity<'a>(rows: impl Iterator<Item = RowRef<'a>>) -> RowBuffer {
        let (mut n, mut tokens, mut masked) = (0, 0, 0);
        for (input_ids, _, positions, _, _) in rows {
            n += 1;
            tokens += input_ids.len();
            masked += positions.len();
        }
        RowBuffer {
            input_ids: Vec::with_capacity(tokens),
            input_offsets: Vec::with_capacity(n + 1),
            token_type_ids: Vec::with_capacity(tokens),
            positions: Vec::with_capacity(masked),
            masked_ids: Vec::with_capacity(masked),
            mask_offsets: Vec::with_capacity(n + 1),
            labels: Vec::with_capacity(n),
        }
    }

    /// Appends one row.
    fn push(&mut self, (input_ids, a_len, positions, masked_ids, label): RowRef<'_>) {
        if self.input_offsets.is_empty() {
            self.input_offsets.push(0);
            self.mask_offsets.push(0);
        }
        self.input_ids.extend(input_ids.iter().map(|&t| t as i32));
        self.input_offsets.push(self.input_ids.len() as i32);
        self.token_type_ids
            .extend((0..input_ids.len()).map(|i| i8::from(i >= a_len as usize)));
        self.positions.extend(positions.iter().map(|&p| p as i32));
        self.masked_ids.extend(masked_ids.iter().map(|&t| t as i32));
        self.mask_offsets.push(self.positions.len() as i32);
        self.labels.push(label as i8);
    }

    fn into_batch(self) -> Result<RecordBatch> {
        let item = |t: DataType| Arc::new(Field::new("item", t, false));
        let input_offsets = OffsetBuffer::new(self.input_offsets.into());
        let mask_offsets = OffsetBuffer::new(self.mask_offsets.into());
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ListArray::new(
                item(DataType::Int32),
                input_offsets.clone(),
                Arc::new(Int32Array::from(self.input_ids)),
                None,
            )),
            Arc::new(ListArray::new(
                item(DataType::Int8),
                input_offsets,
                Arc::new(Int8Array::from(self.token_type_ids)),
                None,
            )),
            Arc::new(ListArray::new(
                item(DataType::Int32),
                mask_offsets.clone(),
                Arc::new(Int32Array::from(self.positions)),
                None,
            )),
            Arc::new(ListArray::new(
                item(DataType::Int32),
                mask_offsets,
                Arc::new(Int32Array::from(self.masked_ids)),
                None,
            )),
            Arc::new(Int8Array::from(self.labels)),
        ];
        RecordBatch::try_new(schema(), columns).context("building a record batch")
    }
}

/// A `Write` that hashes and counts what passes through, so a shard's SHA-256 needs no re-read.
pub(super) struct HashingFile {
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

pub(super) struct OpenShard {
    writer: SerializedFileWriter<io::BufWriter<HashingFile>>,
    final_path: PathBuf,
    file_name: String,
    rows: u64,
    tokens: u64,
}

/// Writes rows into `shard-NNNNN.parquet` files of at most `shard_rows` rows each. Every shard
/// is written under a temporary name and renamed once complete and synced.
///
/// [`ShardWriter::write_rows`] cuts the rows into row groups and gathers each one's rows; the
/// rayon pool it runs on encodes and compresses them in parallel (the expensive part) and
/// they are appended to the files in order (a copy). Where row groups and shards end depends
/// only on row counts, so the bytes do not depend on the number of threads.
///
/// It must be used from a thread of a rayon pool (see [`crate::tasks`]).
pub(crate) struct ShardWriter {
    dir: PathBuf,
    shard_rows: usize,
    row_group_rows: usize,
    props: WriterPropertiesPtr,
    /// Column writers depend only on the schema and the properties, which every shard shares.
    columns: Arc<ArrowRowGroupWriterFactory>,
    /// The start of the next row group: rows left over from the previous call.
    filling: RowBuffer,
    /// Row groups handed to the pool, oldest first; each holds its rows and then its encoded
    /// pages until appended. At most [`crate::tasks::max_pending`].
    in_flight: InOrder<EncodedGroup>,
    /// Rows given to the current shard so far, including those in `filling`.
    rows_in_shard: usize,
    open: Option<OpenShard>,
    done: Vec<ShardEntry>,
}

impl ShardWriter {
    pub(crate) fn new(dir: &Path, shard_rows: usize, row_group_rows: usize) -> Result<ShardWriter> {
        let shard_rows = shard_rows.max(1);
        let row_group_rows = row_group_rows.max(1).min(shard_rows);
        let props = Arc::new(
            WriterProperties::builder()
                // Level 1 against the default 3: 5-7% larger shards, twice the speed; shards
                // are written once and read once per epoch.
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
                .set_created_by(format!("bertrain-dataprep {}", env!("CARGO_PKG_VERSION")))
                // Plain encoding rather than Parquet's default dictionary: hashing every token id
                // into the dictionary took a fifth of dataprep's time, and zstd compresses plain
                // int32 ids as well (the shards came out 1.4% smaller without it).
                .set_dictionary_enabled(false)
                .build(),
        );
        let (_, columns) = new_file_writer(io::sink(), &props)
            .context("setting up the Parquet column encoders")?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            shard_rows,
            row_group_rows,
            props,
            columns: Arc::new(columns),
            filling: RowBuffer::default(),
            in_flight: InOrder::new(),
            rows_in_shard: 0,
            open: None,
            done: Vec::new(),
        })
    }

    /// Writes rows `0..count` of `source` after those of earlier calls. A trailing partial row
    /// group is kept for the next call (or [`ShardWriter::finish`]).
    ///
    /// Each row group becomes a task on the pool that gathers its rows from `source` (a copy)
    /// and encodes them. Encoded groups are appended in order, only once
    /// [`crate::tasks::max_pending`] of them are pending, so this returns with up to that
    /// many still encoding (each holding its `source`), and the serial part (appending to the
    /// file, hashing) overlaps the parallel ones. The caller decides how long they may run
    /// on: [`ShardWriter::drain`] waits for them.
    pub(crate) fn write_rows(&mut self, source: Arc<dyn RowSource>, count: usize) -> Result<()> {
        let mut next = 0;
        while let Some((carried, range, ends_shard)) = self.next_group(&mut next, count, &*source) {
            let rows = GroupRows {
                carried,
                source: Some((Arc::clone(&source), range)),
            };
            self.encode_in_background(rows, ends_shard)?;
        }
        Ok(())
    }

    /// Queues a row group for encoding on the pool, first appending the oldest pending groups
    /// while the queue is full.
    fn encode_in_background(&mut self, rows: GroupRows, ends_shard: bool) -> Result<()> {
        while let Some(encoded) = self.in_flight.make_room()? {
            self.append(encoded)?;
        }
        let columns = Arc::clone(&self.columns);
        self.in_flight
            .spawn(move || encode(&columns, rows, ends_shard));
        Ok(())
    }

    /// Plans the next row group from rows `next..count`: its start (the rows carried from the
    /// previous call, for the first), the range of new rows that completes it, and whether it
    /// ends its shard. Rows that only start a group are kept in `filling`, and then there is
    /// no group to encode.
    fn next_group(
        &mut self,
        next: &mut usize,
        count: usize,
        source: &dyn RowSource,
    ) -> Option<(RowBuffer, Range<usize>, bool)> {
        if *next >= count {
            return None;
        }
        let carried = self.filling.rows();
        let room = (self.row_group_rows - carried).min(self.shard_rows - self.rows_in_shard);
        let range = *next..(*next + room).min(count);
        *next = range.end;
        self.rows_in_shard += range.len();
        let ends_shard = self.rows_in_shard == self.shard_rows;
        if carried + range.len() < self.row_group_rows && !ends_shard {
            range.for_each(|i| self.filling.push(source.row(i)));
            return None;
        }
        if ends_shard {
            self.rows_in_shard = 0;
        }
        Some((std::mem::take(&mut self.filling), range, ends_shard))
    }

    fn append(&mut self, group: EncodedGroup) -> Result<()> {
        if self.open.is_none() {
            self.open_shard()?;
        }
        let shard = self.open.as_mut().expect("opened above");
        let context = || format!("writing {}", temp_name(&shard.final_path).display());
        let mut row_group = shard.writer.next_row_group().with_context(context)?;
        for chunk in group.chunks {
            chunk
                .append_to_row_group(&mut row_group)
                .with_context(context)?;
        }
        row_group.close().with_context(context)?;
        shard.rows += group.rows;
        shard.tokens += group.tokens;
        if group.ends_shard {
            self.close_shard()?;
        }
        Ok(())
    }

    fn open_shard(&mut self) -> Result<()> {
        let file_name = format!("shard-{:05}.parquet", self.done.len());
        let final_path = self.dir.join(&file_name);
        let tmp = temp_name(&final_path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let sink = io::BufWriter::with_capacity(
            1 << 20,
            HashingFile {
                file,
                hasher: Sha256::new(),
                bytes: 0,
            },
        );
        let (writer, _) = new_file_writer(sink, &self.props)
            .with_context(|| format!("starting Parquet file {}", tmp.display()))?;
        self.open = Some(OpenShard {
            writer,
            final_path,
            file_name,
            rows: 0,
            tokens: 0,
        });
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let tmp = temp_name(&shard.final_path);
        let sink = shard
            .writer
            .into_inner()
            .with_context(|| format!("finishing {}", tmp.display()))?;
        let hashing = sink
            .into_inner()
            .map_err(|e| anyhow!("writing {}: {}", tmp.display(), e.error()))?;
        hashing
            .file
            .sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, &shard.final_path).with_context(|| {
            format!(
                "renaming {} to {}",
                tmp.display(),
                shard.final_path.display()
            )
        })?;
        sync_dir(&self.dir)?;
        self.done.push(ShardEntry {
            file: shard.file_name,
            rows: shard.rows,
            tokens: shard.tokens,
            bytes: hashing.bytes,
            sha256: hex(&hashing.hasher.finalize()),
        });
        Ok(())
    }

    /// Appends every row group still encoding, which frees their sources.
    pub(crate) fn drain(&mut self) -> Result<()> {
        while let Some(encoded) = self.in_flight.oldest()? {
            self.append(encoded)?;
        }
        Ok(())
    }

    /// Writes the rows still held, completes the open shard and returns the entries of all
    /// shards, in order.
    pub(crate) fn finish(mut self) -> Result<Vec<ShardEntry>> {
        if self.filling.rows() > 0 {
            let rows = GroupRows {
                carried: std::mem::take(&mut self.filling),
                source: None,
            };
            self.encode_in_background(rows, true)?;
        }
        self.drain()?;
        self.close_shard()?;
        Ok(self.done)
    }
}

/// A Parquet file writer with the shard schema (its Arrow form embedded in the footer, as
/// `ArrowWriter` does) and the factory of its column encoders.
pub(super) fn new_file_writer<W: Write + Send>(
    sink: W,
    props: &WriterPropertiesPtr,
) -> parquet::errors::Result<(SerializedFileWriter<W>, ArrowRowGroupWriterFactory)> {
    ArrowWriter::try_new(sink, schema(), Some(props.as_ref().clone()))?.into_serialized_writer()
}

pub(super) struct EncodedGroup {
    chunks: Vec<ArrowColumnChunk>,
    rows: u64,
    tokens: u64,
    ends_shard: bool,
}

/// Rows a [`ShardWriter`] reads while it encodes them on the pool.
pub(crate) trait RowSource: Send + Sync {
    fn row(&self, i: usize) -> RowRef<'_>;
}

/// One row group's rows: those carried over from the previous call, then a range of a source.
pub(super) struct GroupRows {
    carried: RowBuffer,
    source: Option<(Arc<dyn RowSource>, Range<usize>)>,
}

/// Rows gathered and turned into Arrow arrays at a time while encoding a row group. The
/// encoders keep only their encoded pages, so a group's rows are never all copied at once,
/// nor its Parquet levels (two i16 per token) all computed at once.
pub(super) const ENCODE_ROWS: usize = 1024;

/// Gathers, encodes and compresses one row group's columns.
pub(super) fn encode(
    columns: &ArrowRowGroupWriterFactory,
    rows: GroupRows,
    ends_shard: bool,
) -> Result<EncodedGroup> {
    let schema = schema();
    // One encoder per Parquet leaf column, in schema order.
    let mut writers = columns
        .create_column_writers(0)
        .context("creating Parquet column encoders")?;
    let (mut tokens, mut rows_n) = (0u64, 0u64);
    let mut write = |buffer: RowBuffer| -> Result<()> {
        tokens += buffer.input_ids.len() as u64;
        rows_n += buffer.rows() as u64;
        let batch = buffer.into_batch()?;
        let mut leaves = Vec::with_capacity(writers.len());
        for (array, field) in batch.columns().iter().zip(schema.fields()) {
            leaves.extend(compute_leaves(field, array).context("encoding a row group")?);
        }
        if leaves.len() != writers.len() {
            bail!(
                "internal error: {} Parquet leaves for {} column encoders",
                leaves.len(),
                writers.len()
            );
        }
        for (writer, leaf) in writers.iter_mut().zip(&leaves) {
            writer.write(leaf).context("encoding a row group")?;
        }
        Ok(())
    };
    if rows.carried.rows() > 0 {
        write(rows.carried)?;
    }
    if let Some((source, range)) = rows.source {
        for start in range.clone().step_by(ENCODE_ROWS) {
            let rows = start..(start + ENCODE_ROWS).min(range.end);
            let mut buffer = RowBuffer::with_capacity(rows.clone().map(|i| source.row(i)));
            rows.for_each(|i| buffer.push(source.row(i)));
            write(buffer)?;
        }
    }
    let chunks = writers
        .into_iter()
        .map(|w| w.close().context("encoding a row group"))
        .collect::<Result<_>>()?;
    Ok(EncodedGroup {
        chunks,
        rows: rows_n,
        tokens,
        ends_shard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as `RowRef` borrows it.
    type OwnedRow = (Vec<u32>, u32, Vec<u32>, Vec<u32>, u8);

    /// (length, capacity) of each column.
    fn sizes(b: &RowBuffer) -> [(usize, usize); 7] {
        fn of<T>(v: &Vec<T>) -> (usize, usize) {
            (v.len(), v.capacity())
        }
        [
            of(&b.input_ids),
            of(&b.input_offsets),
            of(&b.token_type_ids),
            of(&b.positions),
            of(&b.masked_ids),
            of(&b.mask_offsets),
            of(&b.labels),
        ]
    }

    #[test]
    fn a_row_buffer_sized_from_its_rows_holds_them_without_growing() {
        let rows: Vec<OwnedRow> = (0..50u32)
            .map(|i| {
                let masked = (i % 4) as usize;
                let ids: Vec<u32> = (0..5 + i % 7).collect();
                (ids, 2, vec![1; masked], vec![9; masked], (i % 2) as u8)
            })
            .collect();
        let refs = || {
            rows.iter()
                .map(|(ids, a, pos, masked, label)| (&ids[..], *a, &pos[..], &masked[..], *label))
        };
        let mut buffer = RowBuffer::with_capacity(refs());
        let room = sizes(&buffer).map(|(_, capacity)| capacity);
        refs().for_each(|row| buffer.push(row));
        assert_eq!(buffer.rows(), 50);
        assert_eq!(sizes(&buffer).map(|(_, capacity)| capacity), room);
        assert_eq!(sizes(&buffer).map(|(len, _)| len), room);
    }
}
