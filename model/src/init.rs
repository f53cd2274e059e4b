//! BERT's initialisation, computed on the host from a seed so that it is the same on every
//! backend and every rank: matrices from a normal distribution truncated at two standard
//! deviations (std = `initializer_range`, as the original TensorFlow code), biases zero,
//! LayerNorm scale one.

use burn::prelude::*;

use crate::bert::BertForPreTraining;
use crate::config::BertConfig;
use crate::params::{ParamLayout, ParamSlot, load_flat_params};

/// A new model with BERT's initial weights, a pure function of `(config, seed)`.
pub fn init_bert<B: Backend>(
    config: &BertConfig,
    seed: u64,
    device: &B::Device,
) -> BertForPreTraining<B> {
    let model = BertForPreTraining::new(config, device);
    let layout = ParamLayout::of(&model);
    let mut flat = vec![0.0f32; layout.total];
    for (index, slot) in layout.slots.iter().enumerate() {
        // One stream per parameter: adding a layer does not reshuffle the others.
        let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        init_slot(slot, config.initializer_range as f32, &mut rng, &mut flat);
    }
    load_flat_params(model, &flat, &layout)
}

/// Fills one parameter's slice of `flat` with its initial values.
pub fn init_slot(slot: &ParamSlot, std: f32, rng: &mut SplitMix64, flat: &mut [f32]) {
    let values = &mut flat[slot.offset..slot.offset + slot.len];
    if slot.name.ends_with("LayerNorm.weight") {
        values.fill(1.0);
    } else if slot.shape.len() == 1 {
        values.fill(0.0);
    } else {
        for v in values.iter_mut() {
            *v = std * rng.truncated_normal();
        }
    }
}

/// A small, fast, well-mixed generator whose stream this project controls (library RNGs
/// may change their streams between versions, which would change initial weights).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn next_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal restricted to [-2, 2] by rejection.
    pub fn truncated_normal(&mut self) -> f32 {
        loop {
            // Box-Muller; one of the pair is enough here.
            let (u, v) = (self.next_f64(), self.next_f64());
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            if z.abs() <= 2.0 {
                return z as f32;
            }
        }
    }
}
