//! Reading a task's examples: GLUE's TSV files as distributed, CSV, JSON Lines and Parquet,
//! into texts and labels, with errors that name the file, the column or row, and what to do.
//!
//! Every format becomes a [`Table`] of optional strings (a JSON null or a Parquet null is
//! None), so column lookup, label parsing and the checks are written once.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use arrow_array::{Array, RecordBatchReader, cast::AsArray, types::*};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A file's rows, every cell as text.
#[derive(Debug)]
pub(crate) struct Table {
    pub path: PathBuf,
    /// Column names; a file read without a header has "0", "1", ...
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    /// How to name row `i` in a message: a line of a text file, a row of a Parquet file.
    row_names: RowNames,
}

#[derive(Debug)]
enum RowNames {
    /// Data row `i` is on line `first + i` (1-based).
    Lines {
        first: usize,
    },
    Rows,
}

impl Table {
    pub(crate) fn row_name(&self, i: usize) -> String {
        match self.row_names {
            RowNames::Lines { first } => format!("line {}", first + i),
            RowNames::Rows => format!("row {}", i + 1),
        }
    }

    /// The index of column `name`, or an error naming the file and the columns it has.
    pub(crate) fn column(&self, name: &str, flag: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c == name)
            .with_context(|| {
                format!(
                    "{} has no column {name:?} (columns: {}); pass the right one with {flag}",
                    self.path.display(),
                    self.columns.join(", ")
                )
            })
    }

    /// The cell of `row` in `column`, or an error naming the row.
    pub(crate) fn cell(&self, row: usize, column: usize) -> Result<&str> {
        match self.rows[row].get(column) {
            Some(Some(value)) => Ok(value),
            Some(None) => bail!(
                "{} {}: column {:?} is empty (null); fill it in or drop the row",
                self.path.display(),
                self.row_name(row),
                self.columns[column]
            ),
            None => bail!(
                "{} {}: has {} fields, so no column {:?}; fix the row (a stray tab or a quote?)",
                self.path.display(),
                self.row_name(row),
                self.rows[row].len(),
                self.columns[column]
            ),
        }
    }
}

/// Reads `path` by its extension: `.tsv`, `.csv`, `.jsonl`/`.json`, `.parquet`. A TSV or
/// CSV file has a header line unless `header` is false (GLUE's CoLA has none).
pub(crate) fn read_table(path: &Path, header: bool) -> Result<Table> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let table = if name.ends_with(".parquet") {
        read_parquet(path)?
    } else {
        let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = String::from_utf8(text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not UTF-8 text (byte {}); convert it to UTF-8",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        if name.ends_with(".tsv") {
            // As GLUE's own readers (`csv.reader(delimiter="\t", quotechar=None)`): no
            // quoting, since GLUE's sentences hold unbalanced quotes.
            let lines = text
                .lines()
                .map(|l| l.split('\t').map(String::from).collect());
            from_lines(path, lines.collect(), header)?
        } else if name.ends_with(".csv") {
            from_lines(path, parse_csv(path, &text)?, header)?
        } else if name.ends_with(".jsonl") || name.ends_with(".json") {
            read_json_lines(path, &text)?
        } else {
            bail!(
                "{}: unknown input format; use a .tsv, .csv, .jsonl or .parquet file",
                path.display()
            );
        }
    };
    if table.rows.is_empty() {
        bail!(
            "{} holds no examples; pass a file with a header and at least one row",
            path.display()
        );
    }
    Ok(table)
}

fn from_lines(path: &Path, mut lines: Vec<Vec<String>>, header: bool) -> Result<Table> {
    // A trailing empty line (or a file of blank lines) is not a row.
    while lines
        .last()
        .is_some_and(|l| l.len() == 1 && l[0].is_empty())
    {
        lines.pop();
    }
    let (columns, first) = if header {
        if lines.is_empty() {
            bail!(
                "{} is empty; pass a file with a header and at least one row",
                path.display()
            );
        }
        let mut columns = lines.remove(0);
        if let Some(first) = columns.first_mut() {
            // A byte-order mark is part of the first name otherwise.
            *first = first.trim_start_matches('\u{feff}').to_string();
        }
        (columns, 2)
    } else {
        let width = lines.iter().map(Vec::len).max().unwrap_or(0);
        ((0..width).map(|i| i.to_string()).collect(), 1)
    };
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows: lines
            .into_iter()
            .map(|l| l.into_iter().map(Some).collect())
            .collect(),
        row_names: RowNames::Lines { first },
    })
}

/// RFC 4180 CSV: fields separated by commas, optionally in double quotes (a quote inside
/// is doubled), which may hold commas and line breaks. Returns records, not lines.
fn parse_csv(path: &Path, text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut quoted_from = None;
    while let Some(c) = chars.next() {
        if quoted_from.is_some() {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted_from = None,
                _ => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted_from = Some(line),
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                line += 1;
            }
            _ => field.push(c),
        }
    }
    if let Some(start) = quoted_from {
        bail!(
            "{} line {start}: a quoted field is never closed; close the quote or escape it as \"\"",
            path.display()
        );
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

fn read_json_lines(path: &Path, text: &str) -> Result<Table> {
    let mut columns: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a JSON object; write one object per line",
                path.display(),
                i + 1
            )
        })?;
        let serde_json::Value::Object(object) = value else {
            bail!(
                "{} line {}: not a JSON object; write one object per line",
                path.display(),
                i + 1
            );
        };
        for key in object.keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
        objects.push(object);
        lines.push(i + 1);
    }
    let rows = objects
        .iter()
        .map(|object| {
            columns
                .iter()
                .map(|c| match object.get(c) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect()
        })
        .collect();
    // JSON Lines may skip blank lines, so rows are named by their own line numbers only
    // when none was skipped; otherwise by their place among the records.
    let contiguous = lines.iter().enumerate().all(|(i, &l)| l == i + 1);
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
        row_names: if contiguous {
            RowNames::Lines { first: 1 }
        } else {
            RowNames::Rows
        },
    })
}

fn read_parquet(path: &Path) -> Result<Table> {
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?
        .build()
        .with_context(|| format!("reading Parquet file {}", path.display()))?;
    let columns: Vec<String> = reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut rows: Vec<Vec<Option<String>>> = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("reading Parquet file {}", path.display()))?;
        let first = rows.len();
        rows.extend((0..batch.num_rows()).map(|_| Vec::with_capacity(columns.len())));
        for (c, array) in batch.columns().iter().enumerate() {
            let cells = strings_of(array.as_ref())
                .with_context(|| format!("{} column {:?}", path.display(), columns[c]))?;
            for (r, cell) in cells.into_iter().enumerate() {
                rows[first + r].push(cell);
            }
        }
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
        row_names: RowNames::Rows,
    })
}

/// A Parquet column's cells as text: strings as they are, numbers and booleans printed.
fn strings_of(array: &dyn Array) -> Result<Vec<Option<String>>> {
    fn each<T: ToString>(array: &dyn Array, value: impl Fn(usize) -> T) -> Vec<Option<String>> {
        (0..array.len())
            .map(|i| (!array.is_null(i)).then(|| value(i).to_string()))
            .collect()
    }
    Ok(match array.data_type() {
        DataType::Utf8 => each(array, |i| array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => each(array, |i| array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => each(array, |i| array.as_string_view().value(i).to_string()),
        DataType::Boolean => each(array, |i| array.as_boolean().value(i)),
        DataType::Int8 => each(array, |i| array.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => each(array, |i| array.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => each(array, |i| array.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => each(array, |i| array.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => each(array, |i| array.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => each(array, |i| array.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => each(array, |i| array.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => each(array, |i| array.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => each(array, |i| array.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => each(array, |i| array.as_primitive::<Float64Type>().value(i)),
        // Columns of other types are kept as nulls: an error arises only if one is used.
        _ => vec![None; array.len()],
    })
}

/// One example as read: its text(s), its label as written, and where it is.
#[derive(Debug, Clone)]
pub(crate) struct RawExample {
    pub a: String,
    pub b: Option<String>,
    pub label: String,
    pub row: usize,
}

/// The columns to read.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    pub text: Vec<String>,
    pub label: String,
}

pub(crate) fn examples(table: &Table, columns: &Columns) -> Result<Vec<RawExample>> {
    let text: Vec<usize> = columns
        .text
        .iter()
        .map(|c| table.column(c, "--text-columns"))
        .collect::<Result<_>>()?;
    let label = table.column(&columns.label, "--label-column")?;
    (0..table.rows.len())
        .map(|row| {
            Ok(RawExample {
                a: table.cell(row, text[0])?.to_string(),
                b: match text.get(1) {
                    Some(&c) => Some(table.cell(row, c)?.to_string()),
                    None => None,
                },
                label: table.cell(row, label)?.trim().to_string(),
                row,
            })
        })
        .collect()
}

/// What the labels are: classes (named in id order) or values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LabelSpace {
    /// Integer labels `0..n` are their own ids; any other labels are named by the sorted
    /// set of the training file's values (as HF's `run_glue.py` does).
    Classes {
        names: Vec<String>,
        integer: bool,
    },
    Regression,
}

impl LabelSpace {
    pub(crate) fn outputs(&self) -> usize {
        match self {
            LabelSpace::Classes { names, .. } => names.len(),
            LabelSpace::Regression => 1,
        }
    }

    /// Decides the label space from the training examples: regression when asked, integer
    /// classes when every label is a non-negative integer (`0..--num-labels`, or up to
    /// the largest), else named classes.
    pub(crate) fn infer(
        train: &[RawExample],
        table: &Table,
        column: &str,
        num_labels: Option<usize>,
        regression: bool,
    ) -> Result<LabelSpace> {
        if regression {
            return Ok(LabelSpace::Regression);
        }
        let ints: Option<Vec<usize>> = train.iter().map(|e| class_id(&e.label)).collect();
        if let Some(ints) = ints {
            let seen = ints.iter().max().map_or(0, |m| m + 1);
            let n = num_labels.unwrap_or(seen.max(2));
            if let Some((e, id)) = train.iter().zip(&ints).find(|(_, id)| **id >= n) {
                bail!(
                    "{} {}: label {id} in column {column:?} is outside --num-labels {n} (labels are 0..{}); \
                     raise --num-labels or fix the row",
                    table.path.display(),
                    table.row_name(e.row),
                    n - 1
                );
            }
            let names = (0..n).map(|i| i.to_string()).collect();
            return Ok(LabelSpace::Classes {
                names,
                integer: true,
            });
        }
        let names: Vec<String> = train
            .iter()
            .map(|e| e.label.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let Some(n) = num_labels
            && n != names.len()
        {
            let example = train
                .iter()
                .find(|e| class_id(&e.label).is_none())
                .expect("some label is not an integer");
            bail!(
                "{} column {column:?}: {} distinct labels ({}), but --num-labels is {n}; \
                 labels are not integers (e.g. {:?} at {}), so pass --num-labels {} or leave it out",
                table.path.display(),
                names.len(),
                names.join(", "),
                example.label,
                table.row_name(example.row),
                names.len()
            );
        }
        if names.len() < 2 {
            bail!(
                "{} column {column:?}: every example has the label {:?}; a classifier needs two \
                 classes at least (for a numeric target pass --regression)",
                table.path.display(),
                names[0]
            );
        }
        Ok(LabelSpace::Classes {
            names,
            integer: false,
        })
    }

    /// The target of one example, or an error naming its row.
    pub(crate) fn target(&self, e: &RawExample, table: &Table, column: &str) -> Result<Target> {
        match self {
            LabelSpace::Regression => e
                .label
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(|v| Target::Value(v as f32))
                .with_context(|| {
                    format!(
                        "{} {}: label {:?} in column {column:?} is not a number, which --regression needs",
                        table.path.display(),
                        table.row_name(e.row),
                        e.label
                    )
                }),
            LabelSpace::Classes { names, integer } => {
                let id = if *integer {
                    class_id(&e.label).filter(|&id| id < names.len())
                } else {
                    names.iter().position(|n| *n == e.label)
                };
                id.map(Target::Class).with_context(|| {
                    let known = if *integer {
                        format!("0..{} (--num-labels {})", names.len() - 1, names.len())
                    } else {
                        format!("those of the training file: {}", names.join(", "))
                    };
                    format!(
                        "{} {}: label {:?} in column {column:?} is not one of {known}; fix the row or the label set",
                        table.path.display(),
                        table.row_name(e.row),
                        e.label
                    )
                })
            }
        }
    }
}

/// A label as a class id: a non-negative integer, also written as a float ("1.0").
fn class_id(label: &str) -> Option<usize> {
    if let Ok(id) = label.parse::<usize>() {
        return Some(id);
    }
    let v = label.parse::<f64>().ok()?;
    (v >= 0.0 && v.fract() == 0.0 && v < 1e9).then_some(v as usize)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    Class(usize),
    Value(f32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn columns(text: &[&str], label: &str) -> Columns {
        Columns {
            text: text.iter().map(|s| s.to_string()).collect(),
            label: label.into(),
        }
    }

    #[test]
    fn reads_tsv_csv_and_json_lines_alike() {
        let dir = tempfile::tempdir().unwrap();
        let tsv = write(
            dir.path(),
            "a.tsv",
            "sentence\tlabel\nit \"was\" good\t1\nbad\t0\n",
        );
        let csv = write(
            dir.path(),
            "a.csv",
            "sentence,label\n\"it \"\"was\"\" good\",1\r\nbad,0\n",
        );
        let jsonl = write(
            dir.path(),
            "a.jsonl",
            "{\"sentence\": \"it \\\"was\\\" good\", \"label\": 1}\n{\"sentence\": \"bad\", \"label\": 0}\n",
        );
        for path in [tsv, csv, jsonl] {
            let table = read_table(&path, true).unwrap();
            let e = examples(&table, &columns(&["sentence"], "label")).unwrap();
            assert_eq!(e.len(), 2, "{}", path.display());
            assert_eq!(e[0].a, "it \"was\" good", "{}", path.display());
            assert_eq!((e[0].label.as_str(), e[1].label.as_str()), ("1", "0"));
        }
    }

    /// Parquet columns of any common type read as text; a null is a missing cell.
    #[test]
    fn reads_parquet_strings_numbers_and_nulls() {
        use std::sync::Arc;

        use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let arrays: Vec<(&str, ArrayRef)> = vec![
            (
                "sentence",
                Arc::new(StringArray::from(vec![Some("good"), None])),
            ),
            ("label", Arc::new(Int64Array::from(vec![1, 0]))),
            ("score", Arc::new(Float64Array::from(vec![4.5, 0.25]))),
        ];
        let batch = RecordBatch::try_from_iter(arrays).unwrap();
        let file = fs::File::create(&path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let table = read_table(&path, true).unwrap();
        assert_eq!(table.columns, vec!["sentence", "label", "score"]);
        assert_eq!(
            table.rows[0],
            vec![Some("good".into()), Some("1".into()), Some("4.5".into())]
        );
        let null = error(examples(&table, &columns(&["sentence"], "label")));
        assert!(
            null.contains("t.parquet row 2") && null.contains("empty (null)"),
            "{null}"
        );
    }

    #[test]
    fn headerless_columns_are_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "cola.tsv", "gj04\t1\t\tThe sailors rode.\n");
        let table = read_table(&path, false).unwrap();
        let e = examples(&table, &columns(&["3"], "1")).unwrap();
        assert_eq!(
            (e[0].a.as_str(), e[0].label.as_str()),
            ("The sailors rode.", "1")
        );
    }

    fn error(result: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn bad_inputs_are_one_line_naming_the_file_column_or_row() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.tsv", "");
        assert!(error(read_table(&empty, true)).contains("empty.tsv is empty"));
        let header_only = write(dir.path(), "head.csv", "sentence,label\n");
        assert!(error(read_table(&header_only, true)).contains("holds no examples"));

        let path = write(
            dir.path(),
            "t.tsv",
            "sentence\tlabel\ngood\t1\nfine\t4\nshort\n",
        );
        let table = read_table(&path, true).unwrap();
        let missing = error(examples(&table, &columns(&["text"], "label")));
        assert!(
            missing.contains("has no column \"text\"") && missing.contains("--text-columns"),
            "{missing}"
        );
        let missing = error(examples(&table, &columns(&["sentence"], "gold")));
        assert!(
            missing.contains("no column \"gold\"") && missing.contains("--label-column"),
            "{missing}"
        );
        let short = error(examples(&table, &columns(&["sentence"], "label")));
        assert!(
            short.contains("t.tsv line 4") && short.contains("no column \"label\""),
            "{short}"
        );

        let path = write(dir.path(), "u.tsv", "sentence\tlabel\ngood\t1\nfine\t4\n");
        let table = read_table(&path, true).unwrap();
        let train = examples(&table, &columns(&["sentence"], "label")).unwrap();
        let outside = error(LabelSpace::infer(&train, &table, "label", Some(2), false));
        assert!(
            outside.contains("u.tsv line 3") && outside.contains("outside --num-labels 2"),
            "{outside}"
        );
        let space = LabelSpace::infer(&train, &table, "label", None, false).unwrap();
        assert_eq!(space.outputs(), 5);

        let jsonl = write(
            dir.path(),
            "n.jsonl",
            "{\"sentence\": \"a\", \"label\": null}\n",
        );
        let table = read_table(&jsonl, true).unwrap();
        let null = error(examples(&table, &columns(&["sentence"], "label")));
        assert!(
            null.contains("n.jsonl line 1") && null.contains("empty (null)"),
            "{null}"
        );
    }

    #[test]
    fn named_labels_are_sorted_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "rte.tsv",
            "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n",
        );
        let table = read_table(&path, true).unwrap();
        let train = examples(&table, &columns(&["sentence1", "sentence2"], "label")).unwrap();
        assert_eq!(train[1].b.as_deref(), Some("d"));
        let space = LabelSpace::infer(&train, &table, "label", None, false).unwrap();
        assert_eq!(
            space.target(&train[0], &table, "label").unwrap(),
            Target::Class(1)
        );
        let mut odd = train[0].clone();
        odd.label = "neutral".into();
        let unknown = error(space.target(&odd, &table, "label"));
        assert!(
            unknown.contains("rte.tsv line 2") && unknown.contains("\"neutral\""),
            "{unknown}"
        );
        let regression = LabelSpace::Regression;
        assert!(error(regression.target(&train[0], &table, "label")).contains("not a number"));
    }
}
