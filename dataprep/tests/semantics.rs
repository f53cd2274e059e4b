//! Statistical tests of the instance generator on documents whose token ids encode where each
//! token came from (document and position), so every property can be checked exactly.

use bertrain_dataprep::instances::{
    InstanceBatch, MaskVocab, TokenizedDoc, instances_from_document,
};
use bertrain_dataprep::{DataprepOptions, SeededRng};

const CLS: u32 = 101;
const SEP: u32 = 102;
const MASK: u32 = 103;
const BASE: u32 = 1000;
const DOC_STRIDE: u32 = 10_000;
const VOCAB: u32 = BASE + 400 * DOC_STRIDE;

/// Token id of position `pos` of document `doc`.
fn id(doc: u32, pos: u32) -> u32 {
    BASE + doc * DOC_STRIDE + pos
}

fn origin(token: u32) -> (u32, u32) {
    ((token - BASE) / DOC_STRIDE, (token - BASE) % DOC_STRIDE)
}

fn corpus(docs: u32, rng: &mut SeededRng) -> Vec<TokenizedDoc> {
    (0..docs)
        .map(|d| {
            let mut doc = TokenizedDoc::default();
            let mut pos = 0;
            for _ in 0..rng.range_inclusive(1, 30) {
                let len = rng.range_inclusive(3, 25) as u32;
                let ids: Vec<u32> = (pos..pos + len).map(|p| id(d, p)).collect();
                pos += len;
                doc.push_sentence(&ids);
            }
            doc
        })
        .collect()
}

fn vocab(continuation: impl Fn(u32) -> bool) -> MaskVocab {
    MaskVocab {
        cls: CLS,
        sep: SEP,
        mask: MASK,
        replaceable: (BASE..VOCAB).collect(),
        is_continuation: (0..VOCAB).map(continuation).collect(),
    }
}

fn generate(
    docs: &[TokenizedDoc],
    opts: &DataprepOptions,
    v: &MaskVocab,
    dupes: u64,
) -> InstanceBatch {
    let mut out = InstanceBatch::new();
    for dupe in 0..dupes {
        let mut rng = SeededRng::from_parts(&[42, dupe]);
        for d in 0..docs.len() {
            instances_from_document(docs, d, opts, v, &mut rng, &mut out);
        }
    }
    out
}

fn options(whole_word_mask: bool) -> DataprepOptions {
    DataprepOptions {
        max_seq_len: 64,
        max_predictions: 8,
        whole_word_mask,
        ..Default::default()
    }
}

/// The row with masked positions put back to their original tokens.
fn unmasked(batch: &InstanceBatch, row: usize) -> Vec<u32> {
    let inst = batch.instance(row);
    let mut ids = inst.input_ids.clone();
    for (&p, &orig) in inst.masked_lm_positions.iter().zip(&inst.masked_lm_ids) {
        ids[p as usize] = orig;
    }
    ids
}

/// Checks that a segment is a contiguous run of one document; returns (doc, first, last).
fn contiguous(segment: &[u32]) -> (u32, u32, u32) {
    assert!(!segment.is_empty(), "empty segment");
    let (doc, first) = origin(segment[0]);
    for (k, &t) in segment.iter().enumerate() {
        assert_eq!(
            origin(t),
            (doc, first + k as u32),
            "segment is not contiguous"
        );
    }
    (doc, first, first + segment.len() as u32 - 1)
}

#[test]
fn structure_nsp_and_masking_follow_the_original_generator() {
    let mut rng = SeededRng::new(9);
    let docs = corpus(300, &mut rng);
    let opts = options(false);
    let batch = generate(&docs, &opts, &vocab(|_| false), 3);
    assert!(batch.rows() >= 3000, "only {} instances", batch.rows());

    let (mut not_next, mut masked, mut as_mask, mut kept, mut random) = (0, 0, 0, 0, 0);
    for r in 0..batch.rows() {
        let inst = batch.instance(r);
        let ids = unmasked(&batch, r);
        let n = ids.len();
        assert!(n <= opts.max_seq_len);
        // [CLS] A [SEP] B [SEP], token types 0 then 1.
        let a_len = inst.token_type_ids.iter().filter(|&&t| t == 0).count();
        assert!(inst.token_type_ids[..a_len].iter().all(|&t| t == 0));
        assert!(inst.token_type_ids[a_len..].iter().all(|&t| t == 1));
        assert_eq!(ids[0], CLS);
        assert_eq!(ids[a_len - 1], SEP);
        assert_eq!(ids[n - 1], SEP);
        let a = &ids[1..a_len - 1];
        let b = &ids[a_len..n - 1];
        let (doc_a, _, a_last) = contiguous(a);
        let (doc_b, b_first, _) = contiguous(b);
        if inst.next_sentence_label == 0 {
            assert_eq!(doc_a, doc_b, "IsNext B from another document");
            assert!(b_first > a_last, "IsNext B does not follow A");
        } else {
            assert_ne!(doc_a, doc_b, "NotNext B from the same document");
            not_next += 1;
        }
        // Masking: the original's count, on distinct non-special positions, ascending.
        let wanted = ((n as f64 * 0.15).round_ties_even() as usize).clamp(1, opts.max_predictions);
        assert_eq!(inst.masked_lm_positions.len(), wanted);
        assert!(inst.masked_lm_positions.windows(2).all(|w| w[0] < w[1]));
        for (&p, &orig) in inst.masked_lm_positions.iter().zip(&inst.masked_lm_ids) {
            let p = p as usize;
            assert!(
                p != 0 && p != a_len - 1 && p != n - 1,
                "special token masked"
            );
            masked += 1;
            match inst.input_ids[p] {
                MASK => as_mask += 1,
                t if t == orig => kept += 1,
                _ => random += 1,
            }
        }
    }
    let rows = batch.rows() as f64;
    let nsp = not_next as f64 / rows;
    // Slightly above 1/2: one-sentence chunks are always NotNext, as in the original.
    assert!((0.47..0.60).contains(&nsp), "NotNext fraction {nsp}");
    let m = masked as f64;
    assert!(
        (0.77..0.83).contains(&(as_mask as f64 / m)),
        "[MASK] {as_mask}/{masked}"
    );
    assert!(
        (0.08..0.12).contains(&(kept as f64 / m)),
        "kept {kept}/{masked}"
    );
    assert!(
        (0.08..0.12).contains(&(random as f64 / m)),
        "random {random}/{masked}"
    );
}

#[test]
fn whole_word_masking_masks_all_pieces_of_a_word() {
    let mut rng = SeededRng::new(10);
    let docs = corpus(200, &mut rng);
    // Every position not divisible by 3 continues the word before it: words of 3 pieces
    // (cut at sentence and segment boundaries).
    let cont = |t: u32| t >= BASE && !((t - BASE) % DOC_STRIDE).is_multiple_of(3);
    let v = vocab(cont);
    let mut opts = options(true);
    opts.max_predictions = 20;
    let batch = generate(&docs, &opts, &v, 2);
    assert!(batch.rows() > 1000);
    let mut total = 0;
    for r in 0..batch.rows() {
        let inst = batch.instance(r);
        let ids = unmasked(&batch, r);
        let a_len = inst.token_type_ids.iter().filter(|&&t| t == 0).count();
        let is_masked = |p: usize| inst.masked_lm_positions.contains(&(p as u32));
        for &p in &inst.masked_lm_positions {
            let p = p as usize;
            total += 1;
            // A masked continuation piece has its word's previous piece masked too
            // (unless that is a special token: the word was cut by truncation or [SEP]).
            if cont(ids[p]) && p >= 1 && ids[p - 1] != CLS && ids[p - 1] != SEP && p != a_len {
                assert!(
                    is_masked(p - 1),
                    "row {r}: piece {p} masked without the one before"
                );
            }
            // And every continuation right after a masked piece is masked.
            if p + 1 < ids.len() && cont(ids[p + 1]) && p + 1 != a_len {
                assert!(is_masked(p + 1), "row {r}: piece {} left unmasked", p + 1);
            }
        }
        let wanted = ((ids.len() as f64 * 0.15).round_ties_even() as usize).clamp(1, 20);
        assert!(inst.masked_lm_positions.len() <= wanted);
    }
    assert!(total > 5000);
}

#[test]
fn a_single_document_never_pairs_with_itself() {
    let mut rng = SeededRng::new(11);
    let docs = corpus(1, &mut rng);
    let batch = generate(&docs, &options(false), &vocab(|_| false), 5);
    for r in 0..batch.rows() {
        assert_eq!(batch.instance(r).next_sentence_label, 0);
    }
}
