//! WordPiece vocabularies: training one, loading any HF-style `vocab.txt`, and building the
//! BERT tokenizer (HF `tokenizers`: BERT normaliser, BERT pre-tokeniser, WordPiece model).
//!
//! Vocabularies we train follow the HF bert-base layout so the special ids match it:
//! `[PAD]`=0, `[unused0]`..`[unused98]` at 1..=99, `[UNK]`=100, `[CLS]`=101, `[SEP]`=102,
//! `[MASK]`=103, and the trained pieces from 104 on. (HF also has ~900 more `[unused]` tokens
//! after 103; we do not spend vocabulary on them.)
//!
//! Lowercasing of a `vocab.txt` is decided, in order, by a `tokenizer_config.json` beside it
//! (`do_lower_case`), by `--lowercase`/`--cased`, or by inference: a vocabulary without any
//! uppercase letter is lowercase.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

use crate::manifest::hex;

pub(crate) const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const UNUSED_BEFORE_UNK: usize = 99;
pub(crate) const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// A vocabulary file as read from disk.
#[derive(Debug, Clone)]
pub struct Vocab {
    pub path: PathBuf,
    pub tokens: Vec<String>,
    pub sha256: String,
    pub lowercase: bool,
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl Vocab {
    /// Reads `vocab.txt` (one token per line, id = line number) and decides lowercasing.
    pub fn load(path: &Path, lowercase_flag: Option<bool>) -> Result<Vocab> {
        let bytes = fs::read(path).with_context(|| {
            format!(
                "reading vocabulary {} (create one with `bertrain vocab` or pass an HF vocab.txt)",
                path.display()
            )
        })?;
        let text = String::from_utf8(bytes.clone()).map_err(|_| {
            anyhow!(
                "vocabulary {} is not UTF-8 text; pass a WordPiece vocab.txt",
                path.display()
            )
        })?;
        let tokens: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
        let find =
            |name: &str| -> Result<u32> {
                tokens.iter().position(|t| t == name).map(|i| i as u32).ok_or_else(|| {
                anyhow!(
                    "vocabulary {} has no {name} token; it is not a BERT WordPiece vocab.txt",
                    path.display()
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
        let lowercase = resolve_lowercase(path, &tokens, lowercase_flag)?;
        Ok(Vocab {
            path: path.to_path_buf(),
            sha256: hex(&Sha256::digest(&bytes)),
            tokens,
            lowercase,
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
        tk.with_normalizer(Some(BertNormalizer::new(true, true, None, self.lowercase)));
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

/// The BERT tokenizer of an HF-style `vocab.txt`. `lowercase` None = decide as described in
/// the module docs (config file, else inference).
pub fn bert_tokenizer(vocab_txt: &Path, lowercase: Option<bool>) -> Result<Tokenizer> {
    Vocab::load(vocab_txt, lowercase)?.tokenizer()
}

fn resolve_lowercase(path: &Path, tokens: &[String], flag: Option<bool>) -> Result<bool> {
    let config = path.with_file_name(TOKENIZER_CONFIG);
    if config.is_file() {
        let text =
            fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
        if let Some(v) = value.get("do_lower_case") {
            let lower = v.as_bool().ok_or_else(|| {
                anyhow!(
                    "{}: do_lower_case must be true or false, found {v}",
                    config.display()
                )
            })?;
            if let Some(f) = flag
                && f != lower
            {
                bail!(
                    "{} says do_lower_case={lower} but {} was given; drop the flag or fix the file",
                    config.display(),
                    if f { "--lowercase" } else { "--cased" }
                );
            }
            return Ok(lower);
        }
    }
    if let Some(f) = flag {
        return Ok(f);
    }
    Ok(!tokens
        .iter()
        .filter(|t| !(t.starts_with('[') && t.ends_with(']')))
        .any(|t| t.chars().any(char::is_uppercase)))
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

/// Writes `tokenizer_config.json` for a vocabulary we produced, so HF tools and our own
/// loader agree on lowercasing.
pub(crate) fn tokenizer_config_json(lowercase: bool) -> String {
    let v = serde_json::json!({
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": null,
        "tokenize_chinese_chars": true,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}
