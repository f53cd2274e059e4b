//! WordPiece vocabularies: training one, loading any HF-style `vocab.txt`, and building the
//! BERT tokenizer (HF `tokenizers`: BERT normaliser, BERT pre-tokeniser, WordPiece model).
//!
//! Vocabularies we train follow the HF bert-base layout so the special ids match it:
//! `[PAD]`=0, `[unused0]`..`[unused98]` at 1..=99, `[UNK]`=100, `[CLS]`=101, `[SEP]`=102,
//! `[MASK]`=103, and the trained pieces from 104 on. (HF also has ~900 more `[unused]` tokens
//! after 103; we do not spend vocabulary on them.)
//!
//! Whether a `vocab.txt` lowercases is decided here, once, for every command that
//! tokenises ([`Casing::decide`]), in the order HF's own loaders use: `do_lower_case` of a
//! `tokenizer_config.json` beside it, else the normaliser of a `tokenizer.json` beside it,
//! else an inference from the vocabulary itself. `--lowercase`/`--cased` override the
//! inference and must agree with a file that says otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Model, Tokenizer};

use bertrain_files::{TOKENIZER_CONFIG_FILE, hex};

pub(crate) const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const UNUSED_BEFORE_UNK: usize = 99;
const TOKENIZER_JSON: &str = "tokenizer.json";

/// A vocabulary is taken as cased when more than this share of its ordinary tokens holds
/// an uppercase letter. Real uncased vocabularies hold a few such tokens (bert-base-uncased
/// has `ℝ` and `##ℝ` among 29,523: letters without a lowercase form), cased ones thousands
/// (bert-base-cased 29%, bert-base-multilingual-cased 16%).
const CASED_UPPERCASE_SHARE: f64 = 0.02;
/// ...and also when fewer than this share of its tokens hold a letter that has case at all:
/// a vocabulary mostly of a script without case, such as bert-base-chinese (19% of its
/// tokens; the English and multilingual ones 70-94%), which HF configures cased.
const CASELESS_SCRIPT_SHARE: f64 = 0.5;

/// Whether text is lowercased (and accent-stripped, as HF's BERT normaliser does with
/// `strip_accents` unset) before WordPiece, and what decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Casing {
    pub lowercase: bool,
    pub source: CasingSource,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CasingSource {
    /// `--lowercase` or `--cased`.
    Flag,
    /// `do_lower_case` in the `tokenizer_config.json` beside the vocabulary.
    TokenizerConfig,
    /// The normaliser of the `tokenizer.json` beside the vocabulary.
    TokenizerJson,
    /// The vocabulary itself: these shares of its ordinary tokens hold an uppercase letter
    /// and a letter that has case.
    Inferred {
        uppercase_share: f64,
        cased_letter_share: f64,
    },
    /// `bertrain vocab` trained the vocabulary this way (`--cased`, or its default).
    Trained,
}

impl fmt::Display for Casing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let case = if self.lowercase { "lowercase" } else { "cased" };
        match &self.source {
            CasingSource::Flag => write!(
                f,
                "{case} (--{})",
                if self.lowercase { "lowercase" } else { "cased" }
            ),
            CasingSource::TokenizerConfig => {
                write!(f, "{case} (do_lower_case in {TOKENIZER_CONFIG_FILE})")
            }
            CasingSource::TokenizerJson => write!(f, "{case} (the normaliser in {TOKENIZER_JSON})"),
            CasingSource::Trained => write!(f, "{case} (as `bertrain vocab` trained it)"),
            CasingSource::Inferred {
                uppercase_share,
                cased_letter_share,
            } => write!(
                f,
                "{case} (inferred from the vocabulary: {:.2}% of its tokens hold an uppercase letter, \
                 {:.0}% a letter with case; pass --lowercase or --cased to decide otherwise)",
                100.0 * uppercase_share,
                100.0 * cased_letter_share
            ),
        }
    }
}

impl Casing {
    /// Decides the casing of `vocab_txt` (whose tokens are `tokens`), as the module docs say.
    pub fn decide(vocab_txt: &Path, tokens: &[String], flag: Option<bool>) -> Result<Casing> {
        let config = vocab_txt.with_file_name(TOKENIZER_CONFIG_FILE);
        let json = vocab_txt.with_file_name(TOKENIZER_JSON);
        // The first file that says something decides; one that says nothing is passed by.
        let mut said = None;
        if config.is_file()
            && let Some(lower) = config_lowercase(&config)?
        {
            said = Some((config, lower, CasingSource::TokenizerConfig));
        }
        if said.is_none()
            && json.is_file()
            && let Some(lower) = tokenizer_json_lowercase(&json)?
        {
            said = Some((json, lower, CasingSource::TokenizerJson));
        }
        if let Some((path, lower, source)) = said {
            if let Some(f) = flag
                && f != lower
            {
                bail!(
                    "{} says {} but {} was given; drop the flag or fix the file",
                    path.display(),
                    if lower {
                        "do_lower_case=true"
                    } else {
                        "do_lower_case=false"
                    },
                    if f { "--lowercase" } else { "--cased" }
                );
            }
            return Ok(Casing {
                lowercase: lower,
                source,
            });
        }
        if let Some(lowercase) = flag {
            return Ok(Casing {
                lowercase,
                source: CasingSource::Flag,
            });
        }
        let (uppercase_share, cased_letter_share) = letter_shares(tokens);
        Ok(Casing {
            lowercase: uppercase_share <= CASED_UPPERCASE_SHARE
                && cased_letter_share >= CASELESS_SCRIPT_SHARE,
            source: CasingSource::Inferred {
                uppercase_share,
                cased_letter_share,
            },
        })
    }

    /// `tokenizer_config.json` for a vocabulary of this casing, so that HF tools and our own
    /// loader agree on it; `bertrain_casing` records what decided it.
    pub fn tokenizer_config_json(&self) -> String {
        let v = serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
            "strip_accents": null,
            "tokenize_chinese_chars": true,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "bertrain_casing": self.to_string(),
        });
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    }
}

/// The shares of ordinary tokens (not `[...]` specials) that hold an uppercase letter, and
/// that hold a letter with case (upper or lower).
fn letter_shares(tokens: &[String]) -> (f64, f64) {
    let ordinary: Vec<&String> = tokens
        .iter()
        .filter(|t| !(t.starts_with('[') && t.ends_with(']')))
        .collect();
    let share = |has: fn(char) -> bool| {
        let n = ordinary.iter().filter(|t| t.chars().any(has)).count();
        n as f64 / ordinary.len().max(1) as f64
    };
    (
        share(char::is_uppercase),
        share(|c| c.is_uppercase() || c.is_lowercase()),
    )
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `do_lower_case` of a `tokenizer_config.json`, if it has one.
fn config_lowercase(path: &Path) -> Result<Option<bool>> {
    match read_json(path)?.get("do_lower_case") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            anyhow!(
                "{}: do_lower_case must be true or false, found {v}",
                path.display()
            )
        }),
    }
}

/// Whether a `tokenizer.json`'s normaliser lowercases: a `BertNormalizer`'s `lowercase`, a
/// `Lowercase` step (also inside a `Sequence`); None when it has no normaliser we know.
fn tokenizer_json_lowercase(path: &Path) -> Result<Option<bool>> {
    fn lowercases(n: &serde_json::Value) -> Option<bool> {
        match n.get("type")?.as_str()? {
            "BertNormalizer" => n.get("lowercase")?.as_bool(),
            "Lowercase" => Some(true),
            "Sequence" => {
                let steps: Vec<Option<bool>> = n
                    .get("normalizers")?
                    .as_array()?
                    .iter()
                    .map(lowercases)
                    .collect();
                match steps.contains(&Some(true)) {
                    true => Some(true),
                    false => steps.iter().all(Option::is_some).then_some(false),
                }
            }
            // Unicode normal forms, stripping, replacing: none of them changes case.
            "NFC" | "NFD" | "NFKC" | "NFKD" | "Strip" | "StripAccents" | "Replace" | "Prepend"
            | "Nmt" => Some(false),
            _ => None,
        }
    }
    Ok(read_json(path)?.get("normalizer").and_then(lowercases))
}

/// A vocabulary file as read from disk.
#[derive(Debug, Clone)]
pub struct Vocab {
    pub path: PathBuf,
    pub tokens: Vec<String>,
    pub sha256: String,
    pub casing: Casing,
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl Vocab {
    /// Reads `vocab.txt` (one token per line, id = line number, read as HF `tokenizers`
    /// reads it: `\n` or `\r\n` line ends, trailing white space dropped) and decides its
    /// casing ([`Casing::decide`]).
    pub fn load(path: &Path, lowercase_flag: Option<bool>) -> Result<Vocab> {
        let bytes = fs::read(path).with_context(|| {
            format!(
                "reading vocabulary {} (create one with `bertrain vocab` or pass an HF vocab.txt)",
                path.display()
            )
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            anyhow!(
                "vocabulary {} is not UTF-8 text (line {line}); pass a WordPiece vocab.txt",
                path.display()
            )
        })?;
        if text.starts_with('\u{feff}') {
            bail!(
                "vocabulary {} starts with a byte-order mark, which HF tokenizers read as part of its first token; \
                 remove it (sed -i '1s/^\\xEF\\xBB\\xBF//' {})",
                path.display(),
                path.display()
            );
        }
        let tokens: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
        let ids = token_ids(path, &tokens)?;
        let find = |name: &str| -> Result<u32> {
            ids.get(name).copied().ok_or_else(|| {
                anyhow!(
                    "vocabulary {} has no {name} token (BERT needs {}); it is not a BERT WordPiece vocab.txt",
                    path.display(),
                    SPECIALS.join(" ")
                )
            })
        };
        let (pad, unk, cls, sep, mask) = (
            find("[PAD]")?,
            find("[UNK]")?,
            find("[CLS]")?,
            find("[SEP]")?,
            find("[MASK]")?,
        );
        let casing = Casing::decide(path, &tokens, lowercase_flag)?;
        tracing::info!("vocabulary {}: {casing}", path.display());
        Ok(Vocab {
            path: path.to_path_buf(),
            sha256: hex(&Sha256::digest(&bytes)),
            tokens,
            casing,
            pad,
            unk,
            cls,
            sep,
            mask,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn token(&self, id: u32) -> &str {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("<out-of-vocab>")
    }

    /// The tokenizer for this vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let map = WordPiece::read_bytes(self.tokens.join("\n").as_bytes())
            .map_err(|e| anyhow!("reading vocabulary {}: {e}", self.path.display()))?;
        let model = WordPiece::builder()
            .vocab(map)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| anyhow!("building WordPiece model from {}: {e}", self.path.display()))?;
        let mut tk = Tokenizer::new(model);
        let lowercase = self.casing.lowercase;
        tk.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
        tk.with_pre_tokenizer(Some(BertPreTokenizer));
        tk.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), self.sep),
            ("[CLS]".into(), self.cls),
        )));
        tk.with_decoder(Some(WordPieceDecoder::default()));
        // Special tokens are matched before normalisation, so "[MASK]" in fill-mask input stays
        // one token even with lowercasing.
        tk.add_special_tokens(
            &SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect::<Vec<_>>(),
        );
        Ok(tk)
    }
}

/// Each token's id. A token on several lines gets the last one, as in HF's readers (the
/// earlier ids are never produced); a special token on several lines is refused, since
/// tools disagree on which one it is.
fn token_ids<'a>(path: &Path, tokens: &'a [String]) -> Result<HashMap<&'a str, u32>> {
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    let mut repeated = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = ids.insert(token.as_str(), id as u32) {
            if SPECIALS.contains(&token.as_str()) {
                bail!(
                    "vocabulary {} has {token} on lines {} and {}; a special token must appear once",
                    path.display(),
                    first + 1,
                    id + 1
                );
            }
            repeated.push(format!("{token:?} (lines {} and {})", first + 1, id + 1));
        }
    }
    if let Some(first) = repeated.first() {
        tracing::warn!(
            "vocabulary {} repeats {} token(s), e.g. {first}; each gets the id of its last line, as in HF",
            path.display(),
            repeated.len()
        );
    }
    Ok(ids)
}

/// The BERT tokenizer of an HF-style `vocab.txt`. `lowercase` None = decide as described in
/// the module docs.
pub fn bert_tokenizer(vocab_txt: &Path, lowercase: Option<bool>) -> Result<Tokenizer> {
    Vocab::load(vocab_txt, lowercase)?.tokenizer()
}

/// Most distinct characters the vocabulary keeps as single-character pieces (HF's default
/// for BERT); the rarest beyond it become `[UNK]`.
const ALPHABET_LIMIT: usize = 1000;

/// Trains a WordPiece vocabulary of at most `vocab_size` entries (fewer when the corpus does
/// not support that many) in the HF bert-base layout. Returns the tokens in id order.
///
/// The same texts give the same vocabulary in every run; see [`DeterministicWordPiece`].
pub(crate) fn train_vocab<I>(texts: I, vocab_size: usize, lowercase: bool) -> Result<Vec<String>>
where
    I: Iterator<Item = String> + Send,
{
    let min = UNUSED_BEFORE_UNK + SPECIALS.len() + 1;
    if vocab_size <= min {
        bail!("--vocab-size {vocab_size} is too small; it must be more than {min}");
    }
    let mut tk = Tokenizer::new(WordPiece::default());
    tk.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    let mut trainer = DeterministicWordPiece {
        vocab_size: vocab_size - UNUSED_BEFORE_UNK,
        words: HashMap::new(),
    };
    tk.train(&mut trainer, texts)
        .map_err(|e| anyhow!("training the WordPiece vocabulary: {e}"))?;
    let mut trained: Vec<(String, u32)> = tk.get_model().get_vocab().into_iter().collect();
    trained.sort_by_key(|(_, id)| *id);
    let mut out = Vec::with_capacity(trained.len() + UNUSED_BEFORE_UNK);
    out.push("[PAD]".to_string());
    out.extend((0..UNUSED_BEFORE_UNK).map(|i| format!("[unused{i}]")));
    out.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    out.extend(
        trained
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| !SPECIALS.contains(&t.as_str())),
    );
    Ok(out)
}

/// tokenizers' WordPiece training (its BPE trainer with the `##` prefix), made
/// deterministic.
///
/// The BPE trainer breaks ties between equally frequent merges by the ids of the pieces, and
/// it numbers each `##c` piece when it first meets it while walking its word-count map:
/// in hash order, and the hash is seeded differently in every process. So equal corpora
/// gave different vocabularies. Here the words are counted first (normalised and
/// pre-tokenised by the tokenizer, as HF's own `feed` does), then every `##c` piece the
/// trainer will need is handed to it up front, sorted, as a special token: they get fixed
/// ids and the rest of the training is a function of the counts. The alphabet limit is
/// applied here too, breaking ties by character, since the trainer breaks them by hash order.
struct DeterministicWordPiece {
    vocab_size: usize,
    words: HashMap<String, u64>,
}

impl tokenizers::Trainer for DeterministicWordPiece {
    type Model = ModelWrapper;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        use rayon::iter::{ParallelBridge, ParallelIterator};
        let counted: tokenizers::Result<HashMap<String, u64>> = iterator
            .par_bridge()
            .map(|text| {
                let mut words = HashMap::new();
                for word in process(text.as_ref())? {
                    *words.entry(word).or_insert(0) += 1;
                }
                Ok(words)
            })
            .try_reduce(HashMap::new, |mut a, b| {
                for (word, n) in b {
                    *a.entry(word).or_insert(0) += n;
                }
                Ok(a)
            });
        self.words = counted?;
        Ok(())
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        let mut chars: BTreeMap<char, u64> = BTreeMap::new();
        for (word, &n) in &self.words {
            for c in word.chars() {
                *chars.entry(c).or_insert(0) += n;
            }
        }
        let mut by_count: Vec<(char, u64)> = chars.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_count.truncate(ALPHABET_LIMIT);
        let alphabet: BTreeSet<char> = by_count.into_iter().map(|(c, _)| c).collect();
        let continuing: BTreeSet<char> = self
            .words
            .keys()
            .flat_map(|w| w.chars().skip(1))
            .filter(|c| alphabet.contains(c))
            .collect();
        let mut specials: Vec<AddedToken> = SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        specials.extend(
            continuing
                .iter()
                .map(|c| AddedToken::from(format!("##{c}"), true)),
        );
        let mut builder = BpeTrainer::builder()
            .vocab_size(self.vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .continuing_subword_prefix("##".into())
            .special_tokens(specials);
        // Only needed past the limit: every kept character then outranks the dropped ones.
        if alphabet.len() == ALPHABET_LIMIT {
            builder = builder
                .limit_alphabet(ALPHABET_LIMIT)
                .initial_alphabet(alphabet.iter().copied().collect());
        }
        let words: ahash::AHashMap<compact_str::CompactString, u64> = self
            .words
            .iter()
            .map(|(w, &n)| (compact_str::CompactString::from(w.as_str()), n))
            .collect();
        let mut bpe = BPE::default();
        builder.build().do_train(&words, &mut bpe)?;
        *model = ModelWrapper::WordPiece(WordPiece::from_bpe(&bpe));
        Ok(SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/real-vocab")
            .join(name)
    }

    /// A copy of the real bert-base-uncased `vocab.txt` in a fresh directory, with `files`
    /// (name, contents) beside it.
    fn uncased_with(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        fs::copy(real("uncased/vocab.txt"), &path).unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        (dir, path)
    }

    fn casing(path: &Path, flag: Option<bool>) -> Result<Casing> {
        Vocab::load(path, flag).map(|v| v.casing)
    }

    #[test]
    fn casing_comes_from_config_then_tokenizer_json_then_the_vocabulary() {
        let (_d, path) = uncased_with(&[]);
        let c = casing(&path, None).unwrap();
        assert!(c.lowercase && matches!(c.source, CasingSource::Inferred { .. }));
        assert!(c.to_string().contains("0.01% of its tokens"), "{c}");
        // A flag overrides an inference...
        let c = casing(&path, Some(false)).unwrap();
        assert_eq!((c.lowercase, &c.source), (false, &CasingSource::Flag));

        // ...but not a file that says otherwise. The real tokenizer.json (all-MiniLM-L6-v2's,
        // which uses this vocabulary) has a lowercasing BertNormalizer.
        let json = fs::read_to_string(real("uncased/shipped_tokenizer.json")).unwrap();
        let (_d, path) = uncased_with(&[(TOKENIZER_JSON, &json)]);
        let c = casing(&path, None).unwrap();
        assert_eq!(
            (c.lowercase, &c.source),
            (true, &CasingSource::TokenizerJson)
        );
        let err = casing(&path, Some(false)).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json says do_lower_case=true but --cased was given"),
            "{err}"
        );

        // tokenizer_config.json comes first; one without do_lower_case says nothing.
        let config = r#"{"do_lower_case": false}"#;
        let (_d, path) = uncased_with(&[(TOKENIZER_CONFIG_FILE, config), (TOKENIZER_JSON, &json)]);
        let c = casing(&path, None).unwrap();
        assert_eq!(
            (c.lowercase, &c.source),
            (false, &CasingSource::TokenizerConfig)
        );
        let (_d, path) = uncased_with(&[(TOKENIZER_CONFIG_FILE, "{}"), (TOKENIZER_JSON, &json)]);
        assert_eq!(
            casing(&path, None).unwrap().source,
            CasingSource::TokenizerJson
        );
        let (_d, path) = uncased_with(&[(TOKENIZER_CONFIG_FILE, r#"{"do_lower_case": "yes"}"#)]);
        let err = casing(&path, None).unwrap_err().to_string();
        assert!(err.contains("do_lower_case must be true or false"), "{err}");

        // What we write says what decided it, and reads back the same.
        let written = c.tokenizer_config_json();
        assert!(written.contains("\"bertrain_casing\": \"cased (do_lower_case in"));
        let (_d, path) = uncased_with(&[(TOKENIZER_CONFIG_FILE, &written)]);
        assert!(!casing(&path, None).unwrap().lowercase);
    }

    fn load_text(text: &str) -> Result<Vocab> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        fs::write(&path, text).unwrap();
        Vocab::load(&path, None)
    }

    #[test]
    fn bad_vocabularies_are_refused_in_one_line_or_read_as_hf_reads_them() {
        let good = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\n";
        let v = load_text(good).unwrap();
        assert_eq!((v.pad, v.unk, v.mask, v.len()), (0, 1, 4, 7));

        // CRLF line ends: HF's readers drop the \r, and so do we.
        let crlf = load_text(&good.replace('\n', "\r\n")).unwrap();
        assert_eq!(crlf.tokens, v.tokens);

        // A repeated ordinary token takes its last line's id, as in HF.
        let repeated = load_text(&format!("{good}the\n")).unwrap();
        let mut ids = Vec::new();
        crate::wordpiece::SentenceTokenizer::new(&repeated)
            .unwrap()
            .encode("the cat", &mut ids)
            .unwrap();
        assert_eq!(ids, [7, 6]);

        let refused = [
            (format!("\u{feff}{good}"), "starts with a byte-order mark"),
            (format!("{good}[SEP]\n"), "has [SEP] on lines 4 and 8"),
            (good.replace("[MASK]\n", ""), "has no [MASK] token"),
            (String::new(), "has no [PAD] token"),
        ];
        for (text, says) in refused {
            let err = format!("{:#}", load_text(&text).unwrap_err());
            assert!(err.contains(says), "{err}");
            assert!(err.contains("vocab.txt") && !err.contains('\n'), "{err}");
        }
        let mut latin1 = good.as_bytes().to_vec();
        latin1.extend_from_slice(b"caf\xe9\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        fs::write(&path, latin1).unwrap();
        let err = format!("{:#}", Vocab::load(&path, None).unwrap_err());
        assert!(err.contains("is not UTF-8 text (line 8)"), "{err}");
    }
}
