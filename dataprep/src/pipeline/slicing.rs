//! Making a window's instances slice by slice: runs of documents cut by token count, each generated in deterministic units and shuffled.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use crate::instances::{InstanceBatch, MaskVocab, TokenizedDoc, instances_from_document};
use crate::rng::Rng;

use super::{DataprepConfig, SALT_SHUFFLE, SALT_UNIT, SliceOutput, UNIT_DOCS};

/// Cuts a split's units (runs of [`UNIT_DOCS`] documents) into slices of about
/// `slice_tokens` tokens.
pub(super) fn slices(docs: &[TokenizedDoc], slice_tokens: usize) -> Vec<Range<usize>> {
    let units = docs.len().div_ceil(UNIT_DOCS);
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for u in 0..units {
        let end_doc = ((u + 1) * UNIT_DOCS).min(docs.len());
        tokens += docs[u * UNIT_DOCS..end_doc]
            .iter()
            .map(|d| d.tokens.len())
            .sum::<usize>();
        if tokens >= slice_tokens || u + 1 == units {
            out.push(start..u + 1);
            (start, tokens) = (u + 1, 0);
        }
    }
    out
}

/// Instances of the documents of `units`, every duplication, in write order. `key` is
/// (window, split, slice). NotNext partners come from all of `docs`.
pub(super) fn generate_slice(
    docs: &[TokenizedDoc],
    units: Range<usize>,
    [window, split, slice]: [u64; 3],
    cfg: &DataprepConfig,
    vocab: &MaskVocab,
) -> SliceOutput {
    let per_dupe = units.len();
    let batches: Vec<InstanceBatch> = (0..cfg.options.dupe_factor * per_dupe)
        .into_par_iter()
        .map(|i| {
            let (dupe, unit) = (i / per_dupe, units.start + i % per_dupe);
            let mut rng = Rng::from_parts(&[
                cfg.options.seed,
                SALT_UNIT,
                window,
                split,
                dupe as u64,
                unit as u64,
            ]);
            GROWING_BATCH.with_borrow_mut(|batch| {
                batch.clear();
                let first = unit * UNIT_DOCS;
                for d in first..(first + UNIT_DOCS).min(docs.len()) {
                    instances_from_document(docs, d, &cfg.options, vocab, &mut rng, batch);
                }
                // A copy with exactly the room it needs, one block per column.
                batch.clone()
            })
        })
        .collect();
    let mut order: Vec<(u32, u32)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.rows() as u32).map(move |r| (b as u32, r)))
        .collect();
    Rng::from_parts(&[cfg.options.seed, SALT_SHUFFLE, window, split, slice]).shuffle(&mut order);
    SliceOutput { batches, order }
}

thread_local! {
    /// Each thread grows a unit's instances here, then hands on an exact-size copy. Growing
    /// every unit's own columns by doubling (and shrinking them after) left each glibc arena
    /// holding the freed intermediate sizes, in holes that later slices did not fit: with two
    /// threads the 10x corpus peaked 1.3x as high as the 1x corpus, against 1.15x this way.
    static GROWING_BATCH: RefCell<InstanceBatch> = RefCell::new(InstanceBatch::new());
}
