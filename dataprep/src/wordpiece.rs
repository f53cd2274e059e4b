//! Sentence tokenisation for dataprep: the HF `tokenizers` BERT pipeline, with a byte-level
//! fast path for pure-ASCII sentences that gives the same ids.
//!
//! Why: the general pipeline keeps character alignments, consults Unicode tables for every
//! character and allocates per word; on English text it was about three quarters of
//! dataprep's time. For ASCII the whole BERT pipeline collapses to simple byte rules:
//!
//! - normaliser (`clean_text`): control bytes other than `\t \n \r` (0x00-0x1F, 0x7F) are
//!   dropped; `\t \n \r` become spaces; accent stripping does nothing; lowercasing is ASCII
//!   lowercasing;
//! - pre-tokeniser: split on spaces (dropped) and on ASCII punctuation (kept as one-character
//!   words);
//! - WordPiece: a word longer than 100 characters is `[UNK]`; otherwise greedy
//!   longest-match-first with `##` continuations, and a word with an unmatched rest is one
//!   `[UNK]`.
//!
//! Sentences with any non-ASCII byte, or with a `[` (which could start a special token such as
//! `[MASK]`, matched before normalisation), go through `tokenizers` unchanged. A test checks
//! both paths agree on text built to hit every rule.

use anyhow::{Result, anyhow};
use rustc_hash::FxHashMap;
use tokenizers::Tokenizer;

use crate::vocab::Vocab;

/// `tokenizers`' default for WordPiece, which [`Vocab::tokenizer`] uses too.
const MAX_WORD_CHARS: usize = 100;

/// Tokenises sentences to vocabulary ids (no special tokens added).
pub struct SentenceTokenizer {
    general: Tokenizer,
    /// Word-initial pieces and `##` continuation pieces (stored without the `##`).
    initial: FxHashMap<Box<[u8]>, u32>,
    continuation: FxHashMap<Box<[u8]>, u32>,
    /// The longest key of either map, in bytes: longer candidates need no lookup.
    longest_piece: usize,
    lowercase: bool,
    unk: u32,
}

impl SentenceTokenizer {
    pub fn new(vocab: &Vocab) -> Result<SentenceTokenizer> {
        let general = vocab.tokenizer()?;
        let mut initial = FxHashMap::default();
        let mut continuation = FxHashMap::default();
        // Later lines win, as in `tokenizers`' vocab reader.
        for (id, token) in vocab.tokens.iter().enumerate() {
            match token.strip_prefix("##") {
                Some(rest) => continuation.insert(rest.as_bytes().into(), id as u32),
                None => initial.insert(token.as_bytes().into(), id as u32),
            };
        }
        let longest_piece = initial
            .keys()
            .chain(continuation.keys())
            .map(|k: &Box<[u8]>| k.len())
            .max()
            .unwrap_or(0);
        // The id `tokenizers` gives an unknown word is that of the vocab's `[UNK]` line.
        let unk = *initial
            .get(b"[UNK]".as_slice())
            .ok_or_else(|| anyhow!("vocabulary {} has no [UNK]", vocab.path.display()))?;
        Ok(SentenceTokenizer {
            general,
            initial,
            continuation,
            longest_piece,
            lowercase: vocab.casing.lowercase,
            unk,
        })
    }

    /// The id of `[UNK]`.
    pub fn unk(&self) -> u32 {
        self.unk
    }

    /// Appends the ids of `sentence` to `out`.
    pub fn encode(&self, sentence: &str, out: &mut Vec<u32>) -> Result<()> {
        if !sentence.is_ascii() || sentence.contains('[') {
            let enc = self
                .general
                .encode_fast(sentence, false)
                .map_err(|e| anyhow!("tokenising a sentence: {e}"))?;
            out.extend_from_slice(enc.get_ids());
            return Ok(());
        }
        let mut word = Word::default();
        for &b in sentence.as_bytes() {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => self.flush_word(&mut word, out),
                0..=0x1f | 0x7f => {} // control bytes are removed, joining their neighbours
                _ if b.is_ascii_punctuation() => {
                    self.flush_word(&mut word, out);
                    self.word_pieces(&[b], out);
                }
                _ if self.lowercase => word.push(b.to_ascii_lowercase()),
                _ => word.push(b),
            }
        }
        self.flush_word(&mut word, out);
        Ok(())
    }

    fn flush_word(&self, word: &mut Word, out: &mut Vec<u32>) {
        match word.bytes() {
            Some([]) => {}
            Some(bytes) => self.word_pieces(bytes, out),
            None => out.push(self.unk), // too long to split into pieces
        }
        word.len = 0;
    }

    /// Greedy longest-match-first WordPiece of one ASCII word of at most
    /// [`MAX_WORD_CHARS`] bytes.
    fn word_pieces(&self, word: &[u8], out: &mut Vec<u32>) {
        let first = out.len();
        let mut start = 0;
        while start < word.len() {
            let table = if start == 0 {
                &self.initial
            } else {
                &self.continuation
            };
            let mut end = word.len().min(start + self.longest_piece);
            let piece = loop {
                if end == start {
                    break None;
                }
                if let Some(&id) = table.get(&word[start..end]) {
                    break Some(id);
                }
                end -= 1;
            };
            match piece {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(first);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }
}

/// The word being read, on the stack: a word longer than [`MAX_WORD_CHARS`] is `[UNK]` as a
/// whole, so only its length matters past that.
struct Word {
    buf: [u8; MAX_WORD_CHARS],
    len: usize,
}

impl Default for Word {
    fn default() -> Word {
        Word {
            buf: [0; MAX_WORD_CHARS],
            len: 0,
        }
    }
}

impl Word {
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
        }
        self.len += 1;
    }

    /// The word's bytes, or None when it is too long to split.
    fn bytes(&self) -> Option<&[u8]> {
        self.buf.get(..self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn vocab(lowercase: bool) -> (tempfile::TempDir, Vocab) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        let mut tokens: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .map(String::from)
            .to_vec();
        let words = [
            "the", "cat", "sat", "on", "mat", "un", "##believ", "##able", "##s", "a", "##b", "##c",
            "ab", "Hello", "hello", "##ing", "run", "x", "##x", "##xx", "1", "##9", "19",
            "cat", // a duplicate: the later id wins in both paths
        ];
        tokens.extend(words.map(String::from));
        tokens.extend(
            "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
                .chars()
                .map(String::from),
        );
        std::fs::write(&path, tokens.join("\n") + "\n").unwrap();
        let v = Vocab::load(&path, Some(lowercase)).unwrap();
        (dir, v)
    }

    fn general_ids(t: &SentenceTokenizer, s: &str) -> Vec<u32> {
        t.general.encode_fast(s, false).unwrap().get_ids().to_vec()
    }

    fn fast_ids(t: &SentenceTokenizer, s: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.encode(s, &mut out).unwrap();
        out
    }

    #[test]
    fn fast_path_matches_tokenizers_on_every_rule() {
        let long_word = "x".repeat(101);
        let just_fits = "x".repeat(100);
        let cases = [
            "the cat sat on the mat.",
            "unbelievables unbelievable believable",
            "Hello, HELLO hello! running runs",
            "  leading and trailing spaces  ",
            "tabs\tand\nnewlines\rhere",
            "control\x07bytes\x0bjoin\x0cwords\x7fhere\x00too",
            "punct(a)b[c]d{e}f'g\"h-i_j~k`l^m@n#o$p%q&r*s+t=u|v\\w/x<y>z?",
            "19 1999 x9 abc abcd zzz",
            long_word.as_str(),
            just_fits.as_str(),
            "",
            " ",
            "\x01",
        ];
        for lowercase in [true, false] {
            let (_dir, v) = vocab(lowercase);
            let t = SentenceTokenizer::new(&v).unwrap();
            for s in cases {
                assert_eq!(
                    fast_ids(&t, s),
                    general_ids(&t, s),
                    "{s:?} lowercase={lowercase}"
                );
            }
            // Random ASCII strings over an alphabet that hits every byte class.
            let alphabet: Vec<u8> = (0u8..128).collect();
            let mut rng = Rng::new(7);
            for _ in 0..3000 {
                let len = rng.below(40);
                let s: String = (0..len)
                    .map(|_| {
                        // Mostly letters from the vocab so pieces match; sometimes anything.
                        if rng.below(4) == 0 {
                            alphabet[rng.below(128)] as char
                        } else {
                            b"thecasbunlievHx19 "[rng.below(18)] as char
                        }
                    })
                    .collect();
                if s.contains('[') {
                    continue; // that goes through `tokenizers` itself
                }
                assert_eq!(
                    fast_ids(&t, &s),
                    general_ids(&t, &s),
                    "{s:?} lowercase={lowercase}"
                );
            }
        }
    }

    #[test]
    fn special_tokens_and_unicode_take_the_general_path() {
        let (_dir, v) = vocab(true);
        let t = SentenceTokenizer::new(&v).unwrap();
        for s in ["the [MASK] sat", "café cat", "[SEP]"] {
            assert_eq!(fast_ids(&t, s), general_ids(&t, s), "{s:?}");
        }
        assert_eq!(fast_ids(&t, "the [MASK]")[1], 4);
    }

    /// bertrain's tokenizer gives exactly the ids of `transformers`' `BertTokenizerFast` on
    /// real text with real vocabularies, its casing decided from `vocab.txt` alone.
    ///
    /// The fixtures in `tests/fixtures/real-vocab` were made once by `make_fixtures.py` there
    /// (SOURCES.md says from which packages, with their hashes and licences): the
    /// vocabularies of bert-base-uncased, bert-base-cased, bert-base-multilingual-cased and
    /// bert-base-chinese as packages of PyPI and crates.io ship them; `text.txt`, 545 lines of
    /// public-domain and freely licensed text from Debian packages and a crate (English,
    /// accented Latin, Greek, Cyrillic, CJK, control characters) plus edge cases; and the ids
    /// `BertTokenizerFast(vocab_file=..., do_lower_case=<the model's HF setting>)` gave each
    /// line (transformers 4.57.6, tokenizers 0.22.2, in a throwaway venv, no special tokens).
    #[test]
    fn ids_match_transformers_on_real_vocabularies() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-vocab");
        let text = std::fs::read_to_string(dir.join("text.txt")).unwrap();
        // Lines end with '\n' only; some hold other Unicode line breaks inside them.
        let lines: Vec<&str> = text.strip_suffix('\n').unwrap().split('\n').collect();
        for (name, lowercase) in [
            ("uncased", true),
            ("cased", false),
            ("multilingual-cased", false),
            ("chinese", false),
        ] {
            let vocab = Vocab::load(&dir.join(name).join("vocab.txt"), None).unwrap();
            assert_eq!(
                vocab.casing.lowercase, lowercase,
                "{name}: {}",
                vocab.casing
            );
            assert!(
                matches!(
                    vocab.casing.source,
                    crate::vocab::CasingSource::Inferred { .. }
                ),
                "{name}: {}",
                vocab.casing
            );
            let t = SentenceTokenizer::new(&vocab).unwrap();
            let expected =
                std::fs::read_to_string(dir.join(format!("expected-{name}.jsonl"))).unwrap();
            let mut ascii = 0;
            for (i, row) in expected.lines().enumerate() {
                let row: serde_json::Value = serde_json::from_str(row).unwrap();
                assert_eq!(row["line"], i + 1);
                let ids: Vec<u32> = serde_json::from_value(row["ids"].clone()).unwrap();
                let line = lines[i];
                assert_eq!(fast_ids(&t, line), ids, "{name} line {}: {line:?}", i + 1);
                assert_eq!(
                    general_ids(&t, line),
                    ids,
                    "{name} line {}: {line:?}",
                    i + 1
                );
                ascii += usize::from(line.is_ascii() && !line.contains('['));
            }
            assert_eq!(expected.lines().count(), lines.len(), "{name}");
            assert!(
                ascii > 250,
                "{name}: only {ascii} lines took the ASCII path"
            );
        }
    }
}
