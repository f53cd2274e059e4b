//! MLM + NSP instance generation with the semantics of the original BERT generator
//! (`create_instances_from_document` and `create_masked_lm_predictions`):
//!
//! - Per document (and per duplication, each with fresh randomness) a target length is chosen:
//!   `max_seq_len - 3`, or with probability `short_seq_prob` a uniform length in
//!   `[2, max_seq_len - 3]`.
//! - Sentences are packed into a chunk until the target length is reached or the document ends.
//!   A is a random number `a_end` of the chunk's leading sentences (1 when the chunk has one).
//! - B is the rest of the chunk (IsNext) or, with probability 1/2 (always, for a one-sentence
//!   chunk), sentences from a random *other* document starting at a random sentence, until the
//!   target is filled (NotNext); the chunk's unused sentences are then put back and start the
//!   next chunk.
//! - `[CLS] A [SEP] B [SEP]` is made to fit by repeatedly dropping a token from the longer side,
//!   at the front or the back with equal probability.
//! - `min(max_predictions, max(1, round(len * masked_lm_prob)))` positions (len counts the
//!   special tokens, as in the original) are chosen among the non-special ones, in random order
//!   of candidate words; with whole-word masking a candidate is a whole word (a piece plus the
//!   following `##` pieces) and words that would overshoot the count are skipped. Each chosen
//!   position becomes `[MASK]` (80%), a random token (10%) or stays (10%).
//!
//! Differences from the original, all deliberate: the other document is drawn uniformly from
//! the other documents of the same set (never the same document; the original retried 10 times
//! and could fall back to the same one), and random replacement tokens are drawn from the
//! vocabulary without the special and `[unused*]` tokens (which the model never sees as input).

use crate::options::DataprepOptions;
use crate::rng::Rng;
use crate::vocab::Vocab;

/// A tokenised document: all tokens flat, with sentence end offsets (so sentences are ranges and
/// A/B segments are ranges of one buffer, with no copying until the instance is written).
#[derive(Debug, Clone, Default)]
pub struct TokenizedDoc {
    pub tokens: Vec<u32>,
    /// `ends[i]` is one past the last token of sentence i; sentences are non-empty.
    pub ends: Vec<u32>,
}

impl TokenizedDoc {
    pub fn push_sentence(&mut self, ids: &[u32]) {
        if !ids.is_empty() {
            self.tokens.extend_from_slice(ids);
            self.ends.push(self.tokens.len() as u32);
        }
    }

    pub fn sentences(&self) -> usize {
        self.ends.len()
    }

    fn start(&self, sentence: usize) -> usize {
        if sentence == 0 {
            0
        } else {
            self.ends[sentence - 1] as usize
        }
    }

    fn end(&self, sentence: usize) -> usize {
        self.ends[sentence] as usize
    }
}

/// What masking needs to know about the vocabulary.
#[derive(Debug, Clone)]
pub struct MaskVocab {
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
    /// Ids random replacement draws from.
    pub replaceable: Vec<u32>,
    /// Whether a token id is a `##` continuation piece (for whole-word masking).
    pub is_continuation: Vec<bool>,
}

impl MaskVocab {
    pub fn from_vocab(v: &Vocab) -> MaskVocab {
        let special = |t: &str| {
            crate::vocab::SPECIALS.contains(&t) || (t.starts_with("[unused") && t.ends_with(']'))
        };
        MaskVocab {
            cls: v.cls,
            sep: v.sep,
            mask: v.mask,
            replaceable: v
                .tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| !special(t))
                .map(|(i, _)| i as u32)
                .collect(),
            is_continuation: v.tokens.iter().map(|t| t.starts_with("##")).collect(),
        }
    }
}

/// Instances in column form, as produced by one unit of work.
/// `clone` gives a copy with no spare capacity.
#[derive(Debug, Default, Clone)]
pub struct InstanceBatch {
    pub input_ids: Vec<u32>,
    /// `offsets[i]..offsets[i + 1]` are row i's ids; starts with 0.
    pub offsets: Vec<u32>,
    /// Length of `[CLS] A [SEP]` per row (the token type 0 part).
    pub a_lens: Vec<u32>,
    pub positions: Vec<u32>,
    pub masked_ids: Vec<u32>,
    pub mask_offsets: Vec<u32>,
    pub labels: Vec<u8>,
}

impl InstanceBatch {
    pub fn new() -> InstanceBatch {
        InstanceBatch {
            offsets: vec![0],
            mask_offsets: vec![0],
            ..Default::default()
        }
    }

    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.input_ids.clear();
        self.offsets.truncate(1);
        self.a_lens.clear();
        self.positions.clear();
        self.masked_ids.clear();
        self.mask_offsets.truncate(1);
        self.labels.clear();
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    pub fn row(&self, i: usize) -> (&[u32], u32, &[u32], &[u32], u8) {
        let (s, e) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        let (ms, me) = (
            self.mask_offsets[i] as usize,
            self.mask_offsets[i + 1] as usize,
        );
        (
            &self.input_ids[s..e],
            self.a_lens[i],
            &self.positions[ms..me],
            &self.masked_ids[ms..me],
            self.labels[i],
        )
    }

    pub fn tokens(&self) -> u64 {
        self.input_ids.len() as u64
    }

    pub fn masked(&self) -> u64 {
        self.positions.len() as u64
    }

    pub fn not_next(&self) -> u64 {
        self.labels.iter().filter(|&&l| l == 1).count() as u64
    }

    /// Converts row `i` to the public row type.
    pub fn instance(&self, i: usize) -> crate::Instance {
        let (ids, a_len, pos, masked, label) = self.row(i);
        crate::Instance {
            input_ids: ids.to_vec(),
            token_type_ids: (0..ids.len())
                .map(|k| u8::from(k >= a_len as usize))
                .collect(),
            masked_lm_positions: pos.to_vec(),
            masked_lm_ids: masked.to_vec(),
            next_sentence_label: label,
        }
    }
}

/// Scratch buffers reused across instances.
#[derive(Default)]
struct Scratch {
    tokens: Vec<u32>,
    words: Vec<(u32, u32)>,
    chosen: Vec<u32>,
}

/// Appends the instances of `docs[doc_index]` (one duplication) to `out`.
pub fn instances_from_document(
    docs: &[TokenizedDoc],
    doc_index: usize,
    opts: &DataprepOptions,
    vocab: &MaskVocab,
    rng: &mut Rng,
    out: &mut InstanceBatch,
) {
    SCRATCH.with_borrow_mut(|scratch| {
        document_instances(docs, doc_index, opts, vocab, rng, scratch, out)
    })
}

thread_local! {
    /// Per thread rather than per call: generation then allocates nothing but its output.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn document_instances(
    docs: &[TokenizedDoc],
    doc_index: usize,
    opts: &DataprepOptions,
    vocab: &MaskVocab,
    rng: &mut Rng,
    scratch: &mut Scratch,
    out: &mut InstanceBatch,
) {
    let doc = &docs[doc_index];
    let max_tokens = opts.max_seq_len - 3;
    let target = if rng.f64() < opts.short_seq_prob {
        rng.range_inclusive(2, max_tokens)
    } else {
        max_tokens
    };
    let n = doc.sentences();
    let mut chunk_start = 0; // first sentence of the current chunk
    let mut i = 0;
    let mut chunk_len = 0;
    while i < n {
        chunk_len += doc.end(i) - doc.start(i);
        if i == n - 1 || chunk_len >= target {
            let chunk_sentences = i + 1 - chunk_start;
            let a_end = if chunk_sentences >= 2 {
                rng.range_inclusive(1, chunk_sentences - 1)
            } else {
                1
            };
            let a = (doc.start(chunk_start), doc.end(chunk_start + a_end - 1));
            let random_next = chunk_sentences == 1 || rng.f64() < 0.5;
            let b_doc;
            let b;
            let mut next_i = i + 1;
            if random_next {
                if docs.len() < 2 {
                    // No other document to draw from (a set of one document): this chunk
                    // cannot form a NotNext pair, and an IsNext pair needs two sentences.
                    if chunk_sentences == 1 {
                        chunk_start = i + 1;
                        chunk_len = 0;
                        i += 1;
                        continue;
                    }
                    b_doc = doc;
                    b = (doc.start(chunk_start + a_end), doc.end(i));
                } else {
                    let mut other = rng.below(docs.len() - 1);
                    if other >= doc_index {
                        other += 1;
                    }
                    let rd = &docs[other];
                    let target_b = target.saturating_sub(a.1 - a.0);
                    let start_sentence = rng.below(rd.sentences());
                    let b_start = rd.start(start_sentence);
                    let mut b_end = b_start;
                    for j in start_sentence..rd.sentences() {
                        b_end = rd.end(j);
                        if b_end - b_start >= target_b {
                            break;
                        }
                    }
                    b_doc = rd;
                    b = (b_start, b_end);
                    // Put the unused sentences back: the next chunk starts right after A.
                    next_i = chunk_start + a_end;
                }
            } else {
                b_doc = doc;
                b = (doc.start(chunk_start + a_end), doc.end(i));
            }
            let is_random = !std::ptr::eq(b_doc, doc);
            let (a, b) = truncate_pair(a, b, max_tokens, rng);
            push_instance(
                &doc.tokens[a.0..a.1],
                &b_doc.tokens[b.0..b.1],
                is_random,
                opts,
                vocab,
                rng,
                scratch,
                out,
            );
            chunk_start = next_i;
            chunk_len = 0;
            i = next_i;
            continue;
        }
        i += 1;
    }
}

/// Drops tokens from the longer side (front or back at random) until the pair fits.
fn truncate_pair(
    mut a: (usize, usize),
    mut b: (usize, usize),
    max_tokens: usize,
    rng: &mut Rng,
) -> ((usize, usize), (usize, usize)) {
    while (a.1 - a.0) + (b.1 - b.0) > max_tokens {
        let side = if a.1 - a.0 > b.1 - b.0 {
            &mut a
        } else {
            &mut b
        };
        if rng.f64() < 0.5 {
            side.0 += 1;
        } else {
            side.1 -= 1;
        }
    }
    (a, b)
}

#[allow(clippy::too_many_arguments)]
fn push_instance(
    a: &[u32],
    b: &[u32],
    is_random_next: bool,
    opts: &DataprepOptions,
    vocab: &MaskVocab,
    rng: &mut Rng,
    s: &mut Scratch,
    out: &mut InstanceBatch,
) {
    let tokens = &mut s.tokens;
    tokens.clear();
    tokens.push(vocab.cls);
    tokens.extend_from_slice(a);
    tokens.push(vocab.sep);
    let a_len = tokens.len();
    tokens.extend_from_slice(b);
    tokens.push(vocab.sep);

    // Candidate words over the non-special positions.
    let words = &mut s.words;
    words.clear();
    for pos in (1..a_len - 1).chain(a_len..tokens.len() - 1) {
        let cont = opts.whole_word_mask
            && vocab
                .is_continuation
                .get(tokens[pos] as usize)
                .copied()
                .unwrap_or(false);
        match words.last_mut() {
            // A continuation extends the previous word only if it is adjacent (not across [SEP]).
            Some(w) if cont && w.1 as usize == pos => w.1 += 1,
            _ => words.push((pos as u32, pos as u32 + 1)),
        }
    }
    rng.shuffle(words);
    let wanted = ((tokens.len() as f64 * opts.masked_lm_prob).round_ties_even() as usize)
        .max(1)
        .min(opts.max_predictions);
    let chosen = &mut s.chosen;
    chosen.clear();
    for &(start, end) in words.iter() {
        if chosen.len() >= wanted {
            break;
        }
        if chosen.len() + (end - start) as usize > wanted {
            continue;
        }
        chosen.extend(start..end);
    }
    chosen.sort_unstable();

    let row_start = out.input_ids.len();
    out.input_ids.extend_from_slice(tokens);
    for &pos in chosen.iter() {
        let original = tokens[pos as usize];
        let replacement = if rng.f64() < 0.8 {
            vocab.mask
        } else if rng.f64() < 0.5 || vocab.replaceable.is_empty() {
            original
        } else {
            *rng.pick(&vocab.replaceable)
        };
        out.input_ids[row_start + pos as usize] = replacement;
        out.positions.push(pos);
        out.masked_ids.push(original);
    }
    out.offsets.push(out.input_ids.len() as u32);
    out.mask_offsets.push(out.positions.len() as u32);
    out.a_lens.push(a_len as u32);
    out.labels.push(u8::from(is_random_next));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleared_batch_generates_what_a_new_one_does_and_its_clone_has_no_spare_room() {
        let docs: Vec<TokenizedDoc> = (0..4u32)
            .map(|d| {
                let mut doc = TokenizedDoc::default();
                for s in 0..6u32 {
                    let ids: Vec<u32> = (0..9).map(|p| 1000 + d * 100 + s * 10 + p).collect();
                    doc.push_sentence(&ids);
                }
                doc
            })
            .collect();
        let opts = DataprepOptions {
            max_seq_len: 32,
            max_predictions: 5,
            ..Default::default()
        };
        let vocab = MaskVocab {
            cls: 1,
            sep: 2,
            mask: 3,
            replaceable: (1000..1500).collect(),
            is_continuation: vec![false; 1500],
        };
        let generate = |seed: u64, out: &mut InstanceBatch| {
            let mut rng = Rng::from_parts(&[seed]);
            for d in 0..docs.len() {
                instances_from_document(&docs, d, &opts, &vocab, &mut rng, out);
            }
        };
        let mut fresh = InstanceBatch::new();
        generate(7, &mut fresh);
        assert!(fresh.rows() > 4);

        let mut reused = InstanceBatch::new();
        generate(8, &mut reused);
        generate(9, &mut reused);
        reused.clear();
        generate(7, &mut reused);
        assert_eq!(format!("{reused:?}"), format!("{fresh:?}"));

        let copy = reused.clone();
        assert_eq!(format!("{copy:?}"), format!("{fresh:?}"));
        assert_eq!(copy.input_ids.capacity(), copy.input_ids.len());
        assert_eq!(copy.positions.capacity(), copy.positions.len());
        assert_eq!(copy.offsets.capacity(), copy.offsets.len());
    }
}
