//! End-to-end dataprep: formats, determinism across thread counts, manifests and partial
//! writes, bad input.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bertrain_dataprep::cli::{VocabArgs, run_vocab};
use bertrain_dataprep::{
    DataprepConfig, MANIFEST_FILE, Manifest, read_rows, row_group_rows, synth_corpus,
};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    corpus: PathBuf,
    vocab: PathBuf,
}

/// A 400-document synthetic corpus and a vocabulary trained on it, shared by the tests.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let corpus = root.join("corpus.txt");
        let text: Vec<String> = synth_corpus(400, 5).collect();
        fs::write(&corpus, text.join("\n\n") + "\n").expect("write corpus");
        let vocab = root.join("vocab").join("vocab.txt");
        run_vocab(VocabArgs {
            input: vec![corpus.clone()],
            vocab_size: 3000,
            lowercase: false,
            cased: false,
            output: vocab.clone(),
            overwrite: false,
        })
        .expect("train vocab");
        Fixture {
            _dir: dir,
            root,
            corpus,
            vocab,
        }
    })
}

fn config(inputs: Vec<PathBuf>, out: &Path) -> DataprepConfig {
    let f = fixture();
    let mut c = DataprepConfig::new(inputs, f.vocab.clone(), out.to_path_buf());
    c.options.shard_rows = 1500;
    c.options.row_group_rows = 256;
    c.window_bytes = 40_000;
    // Several slices per window, so slicing is part of what the tests check.
    c.slice_tokens = 2_000;
    c.options.dupe_factor = 2;
    c
}

fn shard_bytes(m: &Manifest) -> Vec<Vec<u8>> {
    m.shards
        .iter()
        .map(|s| fs::read(m.shard_path(s)).expect("read shard"))
        .collect()
}

#[test]
fn vocab_has_hf_special_ids_and_lowercase_config() {
    let f = fixture();
    let tokens: Vec<String> = fs::read_to_string(&f.vocab)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(tokens[0], "[PAD]");
    assert_eq!(tokens[1], "[unused0]");
    assert_eq!(tokens[100], "[UNK]");
    assert_eq!(tokens[101], "[CLS]");
    assert_eq!(tokens[102], "[SEP]");
    assert_eq!(tokens[103], "[MASK]");
    assert!(tokens.len() > 1000 && tokens.len() <= 3000);
    let config = fs::read_to_string(f.vocab.with_file_name("tokenizer_config.json")).unwrap();
    assert!(config.contains("\"do_lower_case\": true"));
    let tk = bertrain_dataprep::bert_tokenizer(&f.vocab, None).unwrap();
    let enc = tk.encode("The FARM was [MASK].", true).unwrap();
    let ids = enc.get_ids();
    assert_eq!(ids[0], 101);
    assert_eq!(*ids.last().unwrap(), 102);
    assert!(
        ids.contains(&103),
        "[MASK] must stay one token: {:?}",
        enc.get_tokens()
    );
    assert!(enc.get_tokens().contains(&"farm".to_string()));
}

/// The same corpus gives the same vocabulary byte for byte. (HF's trainer alone does not:
/// it breaks ties by ids it hands out in hash order, seeded anew for every map.)
#[test]
fn vocab_training_is_deterministic() {
    let f = fixture();
    let again = f.root.join("vocab-again").join("vocab.txt");
    run_vocab(VocabArgs {
        input: vec![f.corpus.clone()],
        vocab_size: 3000,
        lowercase: false,
        cased: false,
        output: again.clone(),
        overwrite: false,
    })
    .expect("train vocab again");
    let (a, b) = (fs::read(&f.vocab).unwrap(), fs::read(&again).unwrap());
    assert!(
        a == b,
        "two trainings on one corpus gave different vocabularies"
    );
    let text = String::from_utf8(a).unwrap();
    assert!(
        text.lines().any(|t| t.starts_with("##") && t.len() > 3),
        "no merged ## pieces"
    );
}

#[test]
fn output_is_identical_for_any_thread_count_and_rows_read_back() {
    let f = fixture();
    let out1 = f.root.join("det1");
    let out2 = f.root.join("det2");
    let mut c1 = config(vec![f.corpus.clone()], &out1);
    c1.threads = 1;
    let mut c2 = config(vec![f.corpus.clone()], &out2);
    c2.threads = 2;
    // More threads than this machine's cores: tasks then finish in other orders.
    let out5 = f.root.join("det5");
    let mut c5 = config(vec![f.corpus.clone()], &out5);
    c5.threads = 5;
    let r1 = bertrain_dataprep::pipeline::run(&c1).unwrap();
    let r2 = bertrain_dataprep::pipeline::run(&c2).unwrap();
    let r5 = bertrain_dataprep::pipeline::run(&c5).unwrap();
    assert!(r1.train.shards.len() >= 2, "want several shards");
    assert_eq!(r1.train.content_hash(), r2.train.content_hash());
    assert_eq!(shard_bytes(&r1.train), shard_bytes(&r2.train));
    assert_eq!(shard_bytes(&r1.train), shard_bytes(&r5.train));

    let m = Manifest::load(&out1).unwrap();
    m.verify_files().unwrap();
    // Shards are full but the last; row groups are full but the last of each shard.
    for (i, shard) in m.shards.iter().enumerate() {
        if i + 1 < m.shards.len() {
            assert_eq!(shard.rows, 1500, "{}", shard.file);
        }
        let groups = row_group_rows(&m.shard_path(shard)).unwrap();
        assert_eq!(groups.iter().sum::<u64>(), shard.rows);
        let (last, full) = groups.split_last().unwrap();
        assert!(full.iter().all(|&g| g == 256), "{}: {groups:?}", shard.file);
        assert!(*last <= 256 && *last > 0);
    }
    assert_eq!(m.total_rows(), r1.train.totals.instances);
    // No temporary files remain.
    for e in fs::read_dir(&out1).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "left {name}");
    }
    // Row ranges across row-group boundaries equal the same rows of a full read.
    let shard = m.shard_path(&m.shards[0]);
    let all: Vec<_> = read_rows(&shard, 0, m.shards[0].rows)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len() as u64, m.shards[0].rows);
    let part: Vec<_> = read_rows(&shard, 250, 700)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(part, all[250..700].to_vec());
    assert!(read_rows(&shard, 0, m.shards[0].rows + 1).is_err());
    let tokens: u64 = all.iter().map(|r| r.input_ids.len() as u64).sum();
    assert_eq!(tokens, m.shards[0].tokens);
    for r in &all {
        assert!(r.input_ids.len() <= 128);
        assert_eq!(r.input_ids[0], 101);
        assert_eq!(*r.input_ids.last().unwrap(), 102);
    }

    // A different seed gives different data.
    let out3 = f.root.join("det3");
    let mut c3 = config(vec![f.corpus.clone()], &out3);
    c3.options.seed = 7;
    let r3 = bertrain_dataprep::pipeline::run(&c3).unwrap();
    assert_ne!(r3.train.content_hash(), r1.train.content_hash());
}

#[test]
fn compressed_jsonl_and_parquet_inputs_give_the_same_dataset_as_text() {
    let f = fixture();
    let docs: Vec<String> = synth_corpus(400, 5).collect();
    // JSON Lines, gzip: one document per line, sentences joined by spaces (the splitter
    // must recover them).
    let jsonl = f.root.join("corpus.jsonl.gz");
    {
        let mut gz = flate2::write::GzEncoder::new(
            fs::File::create(&jsonl).unwrap(),
            flate2::Compression::default(),
        );
        for d in &docs {
            let line = serde_json::json!({"id": 1, "text": d.replace('\n', " ")});
            writeln!(gz, "{line}").unwrap();
        }
        gz.finish().unwrap();
    }
    // Text, zstd.
    let zst = f.root.join("corpus.txt.zst");
    fs::write(
        &zst,
        zstd::encode_all(fs::read(&f.corpus).unwrap().as_slice(), 3).unwrap(),
    )
    .unwrap();
    // Parquet with a `text` column.
    let parquet = f.root.join("corpus.parquet");
    {
        use arrow_array::{ArrayRef, RecordBatch, StringArray};
        let col: ArrayRef = Arc::new(StringArray::from(docs.clone()));
        let batch = RecordBatch::try_from_iter([("text", col)]).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            fs::File::create(&parquet).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let reference =
        bertrain_dataprep::pipeline::run(&config(vec![f.corpus.clone()], &f.root.join("fmt-text")))
            .unwrap();
    for (name, input) in [("jsonl", jsonl), ("zst", zst), ("parquet", parquet)] {
        let r = bertrain_dataprep::pipeline::run(&config(
            vec![input],
            &f.root.join(format!("fmt-{name}")),
        ))
        .unwrap();
        assert_eq!(
            r.train.content_hash(),
            reference.train.content_hash(),
            "{name} input differs from the text input"
        );
    }
}

#[test]
fn validation_split_holds_out_whole_documents() {
    let f = fixture();
    let out = f.root.join("val");
    let mut c = config(vec![f.corpus.clone()], &out);
    c.options.validation_fraction = 0.1;
    let r = bertrain_dataprep::pipeline::run(&c).unwrap();
    let v = Manifest::load(&out.join("validation")).unwrap();
    v.verify_files().unwrap();
    assert_eq!(v.split, "validation");
    let t = &r.train.totals;
    assert_eq!(t.documents + v.totals.documents, 400);
    assert!(
        (15..=70).contains(&v.totals.documents),
        "{} held out",
        v.totals.documents
    );
    assert!(v.total_rows() > 0);
    assert_eq!(
        r.train.validation_manifest.as_deref(),
        Some("validation/manifest.json")
    );
    // No validation sentence appears in the training rows: compare decoded A segments.
    let train_rows: std::collections::HashSet<Vec<u32>> = r
        .train
        .shards
        .iter()
        .flat_map(|s| read_rows(&r.train.shard_path(s), 0, s.rows).unwrap())
        .map(|row| row.unwrap().input_ids)
        .collect();
    for s in &v.shards {
        for row in read_rows(&v.shard_path(s), 0, s.rows).unwrap() {
            assert!(!train_rows.contains(&row.unwrap().input_ids));
        }
    }
}

#[test]
fn existing_dataset_needs_overwrite_and_foreign_files_are_never_removed() {
    let f = fixture();
    let out = f.root.join("ow");
    bertrain_dataprep::pipeline::run(&config(vec![f.corpus.clone()], &out)).unwrap();
    let err = bertrain_dataprep::pipeline::run(&config(vec![f.corpus.clone()], &out))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--overwrite"), "{err}");
    let mut c = config(vec![f.corpus.clone()], &out);
    c.overwrite = true;
    c.options.shard_rows = 100_000;
    let r = bertrain_dataprep::pipeline::run(&c).unwrap();
    assert_eq!(r.train.shards.len(), 1);
    // The old run's extra shards are gone.
    let parquet_files = fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "parquet")
        })
        .count();
    assert_eq!(parquet_files, 1);

    fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = bertrain_dataprep::pipeline::run(&c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert!(out.join(MANIFEST_FILE).exists());
}

#[test]
fn a_failed_run_leaves_no_manifest_and_a_damaged_shard_is_named() {
    let f = fixture();
    let out = f.root.join("partial");
    // The second input is broken; the first is big enough for shards to be written before
    // the failure is reached.
    let bad = f.root.join("bad.parquet");
    fs::write(&bad, b"not parquet").unwrap();
    let mut c = config(vec![f.corpus.clone(), bad], &out);
    c.options.shard_rows = 300;
    let err = bertrain_dataprep::pipeline::run(&c).unwrap_err();
    assert!(format!("{err:#}").contains("bad.parquet"), "{err:#}");
    assert!(!out.join(MANIFEST_FILE).exists());
    assert!(Manifest::load(&out).is_err());

    let good = f.root.join("damaged");
    let r = bertrain_dataprep::pipeline::run(&config(vec![f.corpus.clone()], &good)).unwrap();
    let shard = r.train.shard_path(&r.train.shards[1]);
    let mut bytes = fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&shard, bytes).unwrap();
    let err = Manifest::load(&good)
        .unwrap()
        .verify_files()
        .unwrap_err()
        .to_string();
    assert!(err.contains("shard-00001.parquet"), "{err}");
    fs::remove_file(&shard).unwrap();
    let err = Manifest::load(&good)
        .unwrap()
        .verify_files()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard-00001.parquet") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_odd_lines_are_counted() {
    let f = fixture();
    let missing = f.root.join("nope.txt");
    let err = bertrain_dataprep::pipeline::run(&config(vec![missing], &f.root.join("e1")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.txt") && err.contains("does not exist"),
        "{err}"
    );

    let mut c = config(vec![f.corpus.clone()], &f.root.join("e2"));
    c.vocab = f.root.join("no-vocab.txt");
    let err = format!("{:#}", bertrain_dataprep::pipeline::run(&c).unwrap_err());
    assert!(err.contains("no-vocab.txt"), "{err}");
    let garbage = f.root.join("garbage-vocab.txt");
    fs::write(&garbage, "a\nb\n").unwrap();
    c.vocab = garbage;
    let err = format!("{:#}", bertrain_dataprep::pipeline::run(&c).unwrap_err());
    assert!(
        err.contains("[PAD]") && err.contains("garbage-vocab.txt"),
        "{err}"
    );

    let pattern = f.root.join("*.nothing");
    let err = bertrain_dataprep::pipeline::run(&config(vec![pattern], &f.root.join("e3")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no files"), "{err}");

    let jsonl = f.root.join("wrong.jsonl");
    fs::write(&jsonl, "{\"body\": \"x\"}\n").unwrap();
    let err = format!(
        "{:#}",
        bertrain_dataprep::pipeline::run(&config(vec![jsonl], &f.root.join("e4"))).unwrap_err()
    );
    assert!(
        err.contains("wrong.jsonl") && err.contains("`text`"),
        "{err}"
    );

    // Invalid UTF-8, a very long line, empty documents and a one-sentence document.
    let odd = f.root.join("odd.txt");
    let mut data = Vec::new();
    data.extend_from_slice(
        b"\n\n\nThe farm was green.\nBad \xff\xfe line.\nThe barn was old.\n\n\n",
    );
    data.extend_from_slice(b"Only one sentence here.\n\n");
    data.extend(std::iter::repeat_n(b'a', 3 << 20));
    data.extend_from_slice(b"\nThe goat ate.\n\n");
    for d in synth_corpus(20, 1) {
        data.extend_from_slice(d.as_bytes());
        data.extend_from_slice(b"\n\n");
    }
    fs::write(&odd, data).unwrap();
    let mut c = config(vec![odd], &f.root.join("odd"));
    c.window_bytes = 4 << 20;
    let r = bertrain_dataprep::pipeline::run(&c).unwrap();
    let t = &r.train.totals;
    assert_eq!(t.invalid_utf8_lines_skipped, 1);
    assert_eq!(t.long_lines_truncated, 1);
    assert_eq!(t.single_sentence_documents, 1);
    assert_eq!(t.documents, 23);
    assert!(t.instances > 0);
}

#[test]
fn directories_and_globs_expand_in_sorted_order() {
    let f = fixture();
    let dir = f.root.join("split-corpus");
    fs::create_dir_all(&dir).unwrap();
    let docs: Vec<String> = synth_corpus(400, 5).collect();
    fs::write(dir.join("a.txt"), docs[..200].join("\n\n") + "\n").unwrap();
    fs::write(dir.join("b.txt"), docs[200..].join("\n\n") + "\n").unwrap();
    fs::write(dir.join(".hidden"), "ignored\n").unwrap();
    let whole =
        bertrain_dataprep::pipeline::run(&config(vec![f.corpus.clone()], &f.root.join("glob-ref")))
            .unwrap();
    let from_dir =
        bertrain_dataprep::pipeline::run(&config(vec![dir.clone()], &f.root.join("glob-dir")))
            .unwrap();
    let from_glob = bertrain_dataprep::pipeline::run(&config(
        vec![dir.join("*.txt")],
        &f.root.join("glob-glob"),
    ))
    .unwrap();
    assert_eq!(from_dir.train.content_hash(), whole.train.content_hash());
    assert_eq!(from_glob.train.content_hash(), whole.train.content_hash());
}

/// The case that turned every capitalised word into [UNK]: Google's bert-base-uncased
/// `vocab.txt` alone (no tokenizer_config.json) on real English text. Its casing is
/// inferred as lowercase, the manifest says so and counts [UNK]; forcing `--cased` on it
/// makes most capitalised words unknown, which the report's warning names.
#[test]
fn a_real_uncased_vocabulary_alone_lowercases_and_unknown_tokens_are_counted() {
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-vocab");
    let dir = tempfile::tempdir().unwrap();
    // The first 260 lines are Pride and Prejudice (public domain, from Debian's
    // r-cran-janeaustenr); ten paragraphs a document.
    let text = fs::read_to_string(real.join("text.txt")).unwrap();
    let paragraphs: Vec<&str> = text.lines().take(260).collect();
    let docs: Vec<String> = paragraphs.chunks(10).map(|c| c.join("\n")).collect();
    let corpus = dir.path().join("austen.txt");
    fs::write(&corpus, docs.join("\n\n") + "\n").unwrap();
    let vocab = dir.path().join("vocab.txt");
    fs::copy(real.join("uncased/vocab.txt"), &vocab).unwrap();

    let run = |lowercase: Option<bool>, out: &str| {
        let mut c = DataprepConfig::new(vec![corpus.clone()], vocab.clone(), dir.path().join(out));
        c.lowercase = lowercase;
        c.options.validation_fraction = 0.2;
        c.show_progress = false;
        bertrain_dataprep::pipeline::run(&c).unwrap()
    };
    let inferred = run(None, "inferred");
    let o = &inferred.train.options;
    assert!(o.lowercase, "{}", o.casing);
    assert!(
        o.casing
            .starts_with("lowercase (inferred from the vocabulary"),
        "{}",
        o.casing
    );
    for m in [&inferred.train, inferred.validation.as_ref().unwrap()] {
        assert!(m.totals.text_tokens > 1000, "{:?}", m.totals);
        assert!(m.totals.unk_share() < 0.001, "{:?}", m.totals);
        let written = Manifest::load(m.dir()).unwrap();
        assert_eq!(written.totals.unk_tokens, m.totals.unk_tokens);
    }
    assert_eq!(inferred.unk_warning(), None);
    let config = fs::read_to_string(dir.path().join("inferred/tokenizer_config.json")).unwrap();
    assert!(config.contains("\"do_lower_case\": true"), "{config}");
    assert!(config.contains("inferred from the vocabulary"), "{config}");

    let forced = run(Some(false), "forced");
    assert!(
        forced.train.totals.unk_share() > 0.02,
        "{:?}",
        forced.train.totals
    );
    let warning = forced.unk_warning().unwrap();
    assert!(
        warning.contains("[UNK]") && warning.contains("--lowercase"),
        "{warning}"
    );
    assert!(warning.contains("cased (--cased)"), "{warning}");
    assert!(!warning.contains('\n'));
}
