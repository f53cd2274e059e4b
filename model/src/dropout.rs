//! Dropout whose masks are drawn on the host when the backend computes on the host.
//!
//! burn's `Dropout` samples a Bernoulli mask element by element through a ChaCha
//! generator, then multiplies twice (mask, then 1/keep): about 10% of a CPU training step
//! of the mini model. On a CPU backend the tensor lives in host memory anyway, so here the
//! mask is made directly as `0` or `1/keep` from SplitMix64 streams, four 16-bit draws per
//! 64-bit output, and applied with one multiply. On other backends (CUDA) the mask would
//! have to be uploaded, so burn's own dropout runs there.
//!
//! A tensor's mask is drawn row by row (a row is its last dimension), each row from a
//! stream of its own keyed by what the row is: (sequence, position) for hidden states,
//! (sequence, head, query) for attention probabilities, where the sequence is counted in
//! the step's global batch. So the padded and the unpadded encoder, which hold the same
//! token in different rows, drop the same units of it, and a sequence gets the same masks
//! whichever rank and micro-batch it falls in: a step's result does not depend on the world
//! size beyond the order of sums (what an elastic job relies on).
//! Each call takes one value from a per-thread stream that [`seed_dropout`] sets, which the
//! trainer does once per micro-batch with a (seed, step) seed: a step's masks are a
//! function of it, so resumed runs repeat it bit for bit. The drop probability is rounded
//! to a multiple of 1/65536 (0.1 becomes 0.100006).

use std::cell::Cell;

use burn::nn::Dropout;
use burn::prelude::*;
use burn::tensor::TensorData;

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0x5EED_D50F_0000_0001) };
    static FIRST_SEQUENCE: Cell<u64> = const { Cell::new(0) };
}

/// Restarts this thread's mask stream from `seed`, for a batch whose first sequence is
/// sequence `first_sequence` of the step's global batch.
pub fn seed_dropout(seed: u64, first_sequence: u64) {
    STATE.with(|s| s.set(seed));
    FIRST_SEQUENCE.with(|f| f.set(first_sequence));
}

/// Where the keys of the batch's sequences start (see [`seed_dropout`]).
pub(crate) fn first_sequence() -> u64 {
    FIRST_SEQUENCE.with(Cell::get)
}

/// `dropout` applied to `x`, whose rows (last dimension) are identified by `keys`: the
/// identity outside training (no autodiff) or at probability 0, host-drawn masks on CPU
/// backends, burn's dropout elsewhere (which ignores the keys).
pub(crate) fn apply<B: Backend, const D: usize>(
    dropout: &Dropout,
    x: Tensor<B, D>,
    keys: &[u64],
) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || dropout.prob == 0.0 {
        return x;
    }
    if !computes_on_host::<B>(&device) {
        return dropout.forward(x);
    }
    let shape = x.shape();
    let row_len = shape.dims::<D>()[D - 1];
    assert_eq!(
        keys.len() * row_len,
        shape.num_elements(),
        "one dropout key per row"
    );
    let mask = host_mask(keys, row_len, dropout.prob);
    x * Tensor::<B, D>::from_data(TensorData::new(mask, shape), &device)
}

/// Whether [`apply`] on `device` reads its keys: in training, on a CPU backend. Callers
/// skip making keys otherwise.
pub fn uses_keys<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device) && computes_on_host::<B>(device)
}

/// Whether `B` keeps tensors in host memory (burn's CPU backends).
pub(crate) fn computes_on_host<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name.contains("flex") || name.contains("ndarray")
}

/// Mask values for rows of `row_len` identified by `keys`: 0 with probability `prob`, else
/// `1 / (1 - prob)`. Takes one value from this thread's stream; each row's values are then a
/// function of that value and the row's key alone.
fn host_mask(keys: &[u64], row_len: usize, prob: f64) -> Vec<f32> {
    let drop_below = (prob * 65536.0).round() as u64;
    let keep_scale = (65536.0 / (65536 - drop_below) as f64) as f32;
    let call = STATE.with(|s| {
        let mut state = s.get();
        let call = splitmix64(&mut state);
        s.set(state);
        call
    });
    let mut mask = Vec::with_capacity(keys.len() * row_len);
    for &key in keys {
        let mut start = call ^ key.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let mut state = splitmix64(&mut start);
        let end = mask.len() + row_len;
        while mask.len() < end {
            let bits = splitmix64(&mut state);
            for lane in 0..4.min(end - mask.len()) {
                let draw = (bits >> (16 * lane)) & 0xFFFF;
                mask.push(if draw < drop_below { 0.0 } else { keep_scale });
            }
        }
    }
    mask
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_at_the_rate_and_keep_the_mean() {
        seed_dropout(3, 0);
        let keys: Vec<u64> = (0..1000).collect();
        let mask = host_mask(&keys, 1003, 0.1);
        assert_eq!(mask.len(), 1_003_000);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.002, "dropped {dropped}");
        let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.003, "mean {mean}");
    }

    #[test]
    fn masks_are_a_function_of_the_seed() {
        seed_dropout(9, 0);
        let a = (host_mask(&[1, 2], 500, 0.1), host_mask(&[1], 10, 0.5));
        seed_dropout(9, 0);
        let b = (host_mask(&[1, 2], 500, 0.1), host_mask(&[1], 10, 0.5));
        seed_dropout(10, 0);
        let c = host_mask(&[1, 2], 500, 0.1);
        assert_eq!(a, b);
        assert_ne!(a.0, c);
        // Consecutive calls draw different masks for the same rows.
        assert_ne!(host_mask(&[1], 64, 0.1), host_mask(&[1], 64, 0.1));
    }

    /// A row's mask depends on its key, not on where the row sits or which other rows are
    /// drawn with it: what lets the unpadded encoder drop what the padded one drops.
    #[test]
    fn a_rows_mask_is_a_function_of_its_key() {
        seed_dropout(5, 0);
        let padded = host_mask(&[10, 11, 12, 20, 21, 22], 64, 0.1);
        seed_dropout(5, 0);
        let packed = host_mask(&[10, 11, 20], 64, 0.1);
        assert_eq!(packed[..128], padded[..128]);
        assert_eq!(packed[128..], padded[3 * 64..4 * 64]);
        assert_ne!(padded[..64], padded[64..128]);
    }
}
