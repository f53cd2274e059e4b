//! Dropout whose masks are drawn on the host when the backend computes on the host.
//!
//! burn's `Dropout` samples a Bernoulli mask element by element through a ChaCha
//! generator, then multiplies twice (mask, then 1/keep): about 10% of a CPU training step
//! of the mini model. On a CPU backend the tensor lives in host memory anyway, so here the
//! mask is made directly as `0` or `1/keep` from a SplitMix64 stream, four 16-bit draws per
//! 64-bit output, and applied with one multiply. On other backends (CUDA) the mask would
//! have to be uploaded, so burn's own dropout runs there.
//!
//! The stream is per thread and set by [`seed_dropout`], which the trainer calls with the
//! same (seed, step, rank, micro-batch) seed it gives burn: a step's masks are a function
//! of that seed, so resumed runs repeat it bit for bit. The drop probability is rounded to
//! a multiple of 1/65536 (0.1 becomes 0.100006).

use std::cell::Cell;

use burn::nn::Dropout;
use burn::prelude::*;
use burn::tensor::TensorData;

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0x5EED_D50F_0000_0001) };
}

/// Restarts this thread's mask stream from `seed`.
pub fn seed_dropout(seed: u64) {
    STATE.with(|s| s.set(seed));
}

/// `dropout` applied to `x`: the identity outside training (no autodiff) or at
/// probability 0, host-drawn masks on CPU backends, burn's dropout elsewhere.
pub(crate) fn apply<B: Backend, const D: usize>(
    dropout: &Dropout,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || dropout.prob == 0.0 {
        return x;
    }
    if !computes_on_host::<B>(&device) {
        return dropout.forward(x);
    }
    let shape = x.shape();
    let mask = host_mask(shape.num_elements(), dropout.prob);
    x * Tensor::<B, D>::from_data(TensorData::new(mask, shape), &device)
}

/// Whether `B` keeps tensors in host memory (burn's CPU backends).
fn computes_on_host<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name.contains("flex") || name.contains("ndarray")
}

/// `n` mask values: 0 with probability `prob`, else `1 / (1 - prob)`.
fn host_mask(n: usize, prob: f64) -> Vec<f32> {
    let drop_below = (prob * 65536.0).round() as u64;
    let keep_scale = (65536.0 / (65536 - drop_below) as f64) as f32;
    let mut state = STATE.with(Cell::get);
    let mut mask = Vec::with_capacity(n);
    while mask.len() < n {
        let bits = splitmix64(&mut state);
        for lane in 0..4.min(n - mask.len()) {
            let draw = (bits >> (16 * lane)) & 0xFFFF;
            mask.push(if draw < drop_below { 0.0 } else { keep_scale });
        }
    }
    STATE.with(|s| s.set(state));
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
        seed_dropout(3);
        let mask = host_mask(1_000_003, 0.1);
        assert_eq!(mask.len(), 1_000_003);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.002, "dropped {dropped}");
        let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.003, "mean {mean}");
    }

    #[test]
    fn masks_are_a_function_of_the_seed() {
        seed_dropout(9);
        let a = (host_mask(1000, 0.1), host_mask(10, 0.5));
        seed_dropout(9);
        let b = (host_mask(1000, 0.1), host_mask(10, 0.5));
        seed_dropout(10);
        let c = host_mask(1000, 0.1);
        assert_eq!(a, b);
        assert_ne!(a.0, c);
    }
}
