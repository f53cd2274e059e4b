//! Reading corpora as a stream of documents (lists of sentences).
//!
//! Formats, chosen by file name (after removing a `.gz` or `.zst` suffix):
//! - `*.jsonl`, `*.ndjson`, `*.json`: JSON Lines, one document per line in a string field `text`.
//! - `*.parquet`: one document per row of a string column `text`.
//! - anything else: the BERT text format, one sentence per line, a blank line between documents.
//!
//! JSON Lines and Parquet documents are split into sentences by [`split_sentences`].
//! Nothing here holds more than one document (plus one Parquet batch) in memory, and every
//! line is read with a length cap, so a file without newlines cannot exhaust memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

/// Longest line of the text format kept whole; longer lines are truncated (and counted).
pub(crate) const MAX_TEXT_LINE_BYTES: usize = 1 << 20;
/// Longest JSON Lines record; longer records are skipped (and counted).
pub(crate) const MAX_JSONL_LINE_BYTES: usize = 64 << 20;

/// What the reader skipped or repaired, for the summary.
#[derive(Debug, Default, Clone)]
pub(crate) struct InputStats {
    pub invalid_utf8_lines: u64,
    pub long_lines_truncated: u64,
    pub malformed_records: u64,
    pub empty_documents: u64,
    pub long_documents_split: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
    Parquet,
}

fn format_of(path: &Path) -> Format {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(&name);
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
        Format::Jsonl
    } else if name.ends_with(".parquet") {
        Format::Parquet
    } else {
        Format::Text
    }
}

/// Expands files, directories (recursively, hidden entries skipped) and glob patterns into a
/// sorted, de-duplicated list of files. A path or pattern matching nothing is an error.
pub(crate) fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        bail!("no --input given; pass corpus files, directories or glob patterns");
    }
    let mut out = Vec::new();
    for input in inputs {
        let text = input.to_string_lossy();
        if !input.exists() && text.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(&text)
                .with_context(|| format!("bad glob pattern {text}"))?
                .filter_map(|p| p.ok())
                .collect();
            matched.sort();
            let before = out.len();
            for m in matched {
                collect(&m, &mut out)?;
            }
            if out.len() == before {
                bail!("input pattern {text} matches no files");
            }
        } else if input.exists() {
            let before = out.len();
            collect(input, &mut out)?;
            if out.len() == before && input.is_dir() {
                bail!("input directory {} holds no files", input.display());
            }
        } else {
            bail!(
                "input {} does not exist; pass corpus files, directories or glob patterns",
                input.display()
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing input directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Counts compressed bytes as they are read, for progress (MB/s of input).
struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_decompressed(path: &Path, counter: &Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).with_context(|| format!("opening input {}", path.display()))?;
    let counted = CountingReader {
        inner: file,
        counter: counter.clone(),
    };
    let name = path.to_string_lossy().to_lowercase();
    Ok(if name.ends_with(".gz") {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::new(counted)),
        ))
    } else if name.ends_with(".zst") {
        let dec = zstd::stream::read::Decoder::new(counted)
            .with_context(|| format!("opening zstd stream {}", path.display()))?;
        Box::new(BufReader::with_capacity(1 << 16, dec))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, counted))
    })
}

/// Reads one line (without the newline) into `buf`, keeping at most `limit` bytes.
/// Returns None at end of input, else whether the line was cut.
fn read_line_capped(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut truncated = false;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if any { Some(truncated) } else { None });
        }
        any = true;
        let (chunk, done) = match memchr(available) {
            Some(i) => (&available[..i], i + 1),
            None => (available, available.len()),
        };
        let room = limit.saturating_sub(buf.len());
        if chunk.len() > room {
            truncated = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let found_newline = done > chunk.len();
        reader.consume(done);
        if found_newline {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(truncated));
        }
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// Longest valid UTF-8 prefix of a line that was cut mid-character.
fn utf8_prefix(bytes: &[u8]) -> Option<&str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&bytes[..e.valid_up_to()]).ok(),
        Err(_) => None,
    }
}

enum Source {
    Text(Box<dyn BufRead + Send>),
    Jsonl(Box<dyn BufRead + Send>, u64),
    Parquet(ParquetRecordBatchReader, VecDeque<String>),
}

/// Streams documents from all inputs in order. Each document is a list of non-empty sentences;
/// empty documents are skipped and counted.
pub(crate) struct DocumentReader {
    files: VecDeque<PathBuf>,
    current: Option<(PathBuf, Source)>,
    line: Vec<u8>,
    max_doc_bytes: usize,
    pub(crate) stats: InputStats,
    pub(crate) bytes_read: Arc<AtomicU64>,
}

impl DocumentReader {
    /// `max_doc_bytes`: documents longer than this are cut into pieces (counted), so one
    /// enormous document cannot defeat the memory bound.
    pub(crate) fn new(files: Vec<PathBuf>, max_doc_bytes: usize) -> DocumentReader {
        DocumentReader {
            files: files.into(),
            current: None,
            line: Vec::new(),
            max_doc_bytes: max_doc_bytes.max(1024),
            stats: InputStats::default(),
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }

    fn open(&mut self, path: PathBuf) -> Result<()> {
        let source = match format_of(&path) {
            Format::Text => Source::Text(open_decompressed(&path, &self.bytes_read)?),
            Format::Jsonl => Source::Jsonl(open_decompressed(&path, &self.bytes_read)?, 0),
            Format::Parquet => {
                let name = path.to_string_lossy().to_lowercase();
                if name.ends_with(".gz") || name.ends_with(".zst") {
                    bail!(
                        "input {} is a compressed Parquet file; Parquet compresses internally, decompress it first",
                        path.display()
                    );
                }
                let file = File::open(&path)
                    .with_context(|| format!("opening input {}", path.display()))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                    .with_context(|| format!("reading Parquet input {}", path.display()))?;
                let schema = builder.schema().clone();
                let index = schema.index_of("text").map_err(|_| {
                    anyhow!(
                        "Parquet input {} has no column `text` (columns: {}); documents must be in a string column named `text`",
                        path.display(),
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                match schema.field(index).data_type() {
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {}
                    other => bail!(
                        "Parquet input {} column `text` has type {other}, expected a string column",
                        path.display()
                    ),
                }
                let mask =
                    parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), ["text"]);
                let reader = builder
                    .with_projection(mask)
                    .with_batch_size(256)
                    .build()
                    .with_context(|| format!("reading Parquet input {}", path.display()))?;
                // Progress for Parquet advances per file: the reader does its own I/O.
                self.bytes_read.fetch_add(size, Ordering::Relaxed);
                Source::Parquet(reader, VecDeque::new())
            }
        };
        self.current = Some((path, source));
        Ok(())
    }

    /// The next raw document (its sentences), or None at the end of all inputs.
    fn next_raw(&mut self) -> Result<Option<Vec<String>>> {
        loop {
            if self.current.is_none() {
                match self.files.pop_front() {
                    Some(p) => self.open(p)?,
                    None => return Ok(None),
                }
            }
            let (path, source) = self.current.as_mut().expect("opened above");
            let doc = match source {
                Source::Text(r) => {
                    read_text_document(r.as_mut(), &mut self.line, &mut self.stats, path)?
                }
                Source::Jsonl(r, line_no) => {
                    read_jsonl_document(r.as_mut(), &mut self.line, line_no, &mut self.stats, path)?
                }
                Source::Parquet(reader, pending) => read_parquet_document(reader, pending, path)?,
            };
            match doc {
                Some(d) => return Ok(Some(d)),
                None => self.current = None,
            }
        }
    }

    /// The next non-empty document, split if longer than the document cap.
    pub(crate) fn next_document(
        &mut self,
        pending: &mut VecDeque<Vec<String>>,
    ) -> Result<Option<Vec<String>>> {
        loop {
            if let Some(d) = pending.pop_front() {
                return Ok(Some(d));
            }
            let Some(doc) = self.next_raw()? else {
                return Ok(None);
            };
            if doc.is_empty() {
                self.stats.empty_documents += 1;
                continue;
            }
            let bytes: usize = doc.iter().map(|s| s.len()).sum();
            if bytes <= self.max_doc_bytes {
                return Ok(Some(doc));
            }
            self.stats.long_documents_split += 1;
            let mut piece = Vec::new();
            let mut piece_bytes = 0;
            for s in doc {
                if piece_bytes + s.len() > self.max_doc_bytes && !piece.is_empty() {
                    pending.push_back(std::mem::take(&mut piece));
                    piece_bytes = 0;
                }
                piece_bytes += s.len();
                piece.push(s);
            }
            if !piece.is_empty() {
                pending.push_back(piece);
            }
        }
    }
}

/// Text format: returns the next document (possibly empty if only blank lines remain before a
/// boundary), or None at end of file.
fn read_text_document(
    reader: &mut dyn BufRead,
    line: &mut Vec<u8>,
    stats: &mut InputStats,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    let mut doc = Vec::new();
    let mut saw_line = false;
    loop {
        let Some(truncated) = read_line_capped(reader, line, MAX_TEXT_LINE_BYTES)
            .with_context(|| format!("reading input {}", path.display()))?
        else {
            return Ok(if saw_line { Some(doc) } else { None });
        };
        saw_line = true;
        let text = if truncated {
            stats.long_lines_truncated += 1;
            utf8_prefix(line)
        } else {
            std::str::from_utf8(line).ok()
        };
        let Some(text) = text else {
            stats.invalid_utf8_lines += 1;
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            if doc.is_empty() {
                continue;
            }
            return Ok(Some(doc));
        }
        doc.push(text.to_string());
    }
}

fn read_jsonl_document(
    reader: &mut dyn BufRead,
    line: &mut Vec<u8>,
    line_no: &mut u64,
    stats: &mut InputStats,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    loop {
        let Some(truncated) = read_line_capped(reader, line, MAX_JSONL_LINE_BYTES)
            .with_context(|| format!("reading input {}", path.display()))?
        else {
            return Ok(None);
        };
        *line_no += 1;
        if truncated {
            stats.long_lines_truncated += 1;
            continue;
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let text = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) => v.get("text").and_then(|t| t.as_str()).map(str::to_owned),
            Err(_) => None,
        };
        let Some(text) = text else {
            // A first record that does not parse means the file is not what the user thinks;
            // later bad records are skipped so one damaged line does not cost a long run.
            if *line_no == 1 {
                bail!(
                    "{} line 1 is not a JSON object with a string field `text`; JSON Lines input needs {{\"text\": \"...\"}} per line",
                    path.display()
                );
            }
            stats.malformed_records += 1;
            continue;
        };
        let mut doc = Vec::new();
        split_sentences(&text, &mut doc);
        return Ok(Some(doc));
    }
}

fn read_parquet_document(
    reader: &mut ParquetRecordBatchReader,
    pending: &mut VecDeque<String>,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    loop {
        if let Some(text) = pending.pop_front() {
            let mut doc = Vec::new();
            split_sentences(&text, &mut doc);
            return Ok(Some(doc));
        }
        let Some(batch) = reader.next() else {
            return Ok(None);
        };
        let batch = batch.with_context(|| format!("reading Parquet input {}", path.display()))?;
        let col = batch.column(0);
        let mut push = |v: Option<&str>| {
            if let Some(s) = v {
                pending.push_back(s.to_string())
            }
        };
        match col.data_type() {
            DataType::Utf8 => col.as_string::<i32>().iter().for_each(&mut push),
            DataType::LargeUtf8 => col.as_string::<i64>().iter().for_each(&mut push),
            DataType::Utf8View => col.as_string_view().iter().for_each(&mut push),
            other => bail!(
                "Parquet input {} column `text` has type {other}, expected a string column",
                path.display()
            ),
        }
        if col.null_count() == col.len() && !col.is_empty() {
            continue;
        }
    }
}

/// Words after which a full stop does not end a sentence. Case matters: titles are
/// capitalised, so a lowercase noun like "no" or "co" still ends a sentence.
const ABBREVIATIONS: &[&str] = &[
    "Mr", "Mrs", "Ms", "Dr", "St", "Prof", "Jr", "Sr", "Inc", "Ltd", "Co", "Mt", "Gen", "Col",
    "Capt", "Fig", "No", "Vol", "etc", "e.g", "i.e", "vs", "approx", "cf",
];

/// Splits running text into sentences: at newlines, and after `.`, `!` or `?` (plus closing
/// quotes or brackets) followed by whitespace and a capital letter, digit or opening quote,
/// except after common abbreviations and single-letter initials.
pub fn split_sentences(text: &str, out: &mut Vec<String>) {
    for line in text.split('\n') {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        let mut start = 0;
        let mut i = 0;
        while i < chars.len() {
            let (_, c) = chars[i];
            if matches!(c, '.' | '!' | '?') {
                let mut j = i + 1;
                while j < chars.len() && matches!(chars[j].1, '"' | '\'' | ')' | ']' | '”' | '’')
                {
                    j += 1;
                }
                let mut k = j;
                while k < chars.len() && chars[k].1.is_whitespace() {
                    k += 1;
                }
                let next_starts_sentence = k > j
                    && k < chars.len()
                    && (chars[k].1.is_uppercase()
                        || chars[k].1.is_ascii_digit()
                        || matches!(chars[k].1, '"' | '\'' | '(' | '“' | '‘'));
                if next_starts_sentence && !(c == '.' && is_abbreviation(line, start, chars[i].0)) {
                    let end = if j < chars.len() {
                        chars[j].0
                    } else {
                        line.len()
                    };
                    let s = line[start..end].trim();
                    if !s.is_empty() {
                        out.push(s.to_string());
                    }
                    start = chars[k].0;
                    i = k;
                    continue;
                }
            }
            i += 1;
        }
        let s = line[start..].trim();
        if !s.is_empty() {
            out.push(s.to_string());
        }
    }
}

fn is_abbreviation(line: &str, sentence_start: usize, dot: usize) -> bool {
    let before = &line[sentence_start..dot];
    let word = before
        .rsplit(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("");
    (word.chars().count() == 1 && word.chars().all(|c| c.is_uppercase()))
        || ABBREVIATIONS.contains(&word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sentences_but_not_abbreviations() {
        let mut out = Vec::new();
        split_sentences(
            "Dr. Smith went home. He slept! Did J. R. Bloggs stay? \"Yes,\" said she.\nNew line",
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                "Dr. Smith went home.",
                "He slept!",
                "Did J. R. Bloggs stay?",
                "\"Yes,\" said she.",
                "New line"
            ]
        );
    }

    #[test]
    fn capped_lines_and_crlf() {
        let data = b"abc\r\nxxxxxxxxxx\nlast";
        let mut r: &[u8] = data;
        let mut buf = Vec::new();
        assert_eq!(read_line_capped(&mut r, &mut buf, 4).unwrap(), Some(false));
        assert_eq!(buf, b"abc");
        assert_eq!(read_line_capped(&mut r, &mut buf, 4).unwrap(), Some(true));
        assert_eq!(buf, b"xxxx");
        assert_eq!(read_line_capped(&mut r, &mut buf, 4).unwrap(), Some(false));
        assert_eq!(buf, b"last");
        assert_eq!(read_line_capped(&mut r, &mut buf, 4).unwrap(), None);
    }
}
