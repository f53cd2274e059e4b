//! Optimizers over flat parameter buffers: AdamW (BERT's) and LAMB (You et al., "Large
//! Batch Optimization for Deep Learning"), plus global-norm gradient clipping.
//!
//! Parameters, gradients and both moment buffers are flat `f32` slices laid out by
//! [`ParamLayout`]; that is what the all-reduce produces and what a checkpoint stores,
//! so the optimizer needs no tensors and its state is saved by name.
//!
//! AdamW here is burn's `burn::optim::AdamW` update rule on those buffers, except that
//! biases and LayerNorm parameters are not decayed (as in BERT). The trainer's tests
//! run both side by side on a model and require the same parameters.

/// Which update rule (the job file's `train.optimizer`); see the module docs.
pub use bertrain_coordinator::job::Optimizer;
use bertrain_coordinator::job::TrainSection;
use bertrain_model::ParamLayout;

#[derive(Debug, Clone, Copy)]
pub struct OptimizerConfig {
    pub kind: Optimizer,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// Decoupled weight decay, applied to matrices only (not biases, not LayerNorm).
    pub weight_decay: f32,
}

impl OptimizerConfig {
    /// BERT's settings: β 0.9/0.999, ε 1e-6.
    pub fn bert(kind: Optimizer, weight_decay: f32) -> Self {
        OptimizerConfig {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-6,
            weight_decay,
        }
    }

    /// BERT's settings with the job's optimizer and weight decay.
    pub fn from_job(t: &TrainSection) -> Self {
        Self::bert(t.optimizer, t.weight_decay as f32)
    }
}

/// The optimizer's state: first and second moments and the number of updates made.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl OptimizerState {
    pub fn new(num_params: usize) -> Self {
        OptimizerState {
            step: 0,
            exp_avg: vec![0.0; num_params],
            exp_avg_sq: vec![0.0; num_params],
        }
    }
}

/// One update of `params` with `grads` at learning rate `lr`.
pub fn update(
    config: &OptimizerConfig,
    layout: &ParamLayout,
    state: &mut OptimizerState,
    params: &mut [f32],
    grads: &[f32],
    lr: f32,
) {
    state.step += 1;
    let t = state.step as i32;
    let bias1 = 1.0 - config.beta1.powi(t);
    let bias2 = 1.0 - config.beta2.powi(t);
    for slot in &layout.slots {
        let range = slot.offset..slot.offset + slot.len;
        let decay = if slot.decays() {
            config.weight_decay
        } else {
            0.0
        };
        let p = &mut params[range.clone()];
        let g = &grads[range.clone()];
        let m = &mut state.exp_avg[range.clone()];
        let v = &mut state.exp_avg_sq[range];
        let direction = |p: f32, g: f32, m: &mut f32, v: &mut f32| {
            adam_direction(config, bias1, bias2, decay, p, g, m, v)
        };
        match config.kind {
            Optimizer::Adamw => {
                // Zipped slices (no indexing) so the loop vectorises.
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                    *p -= lr * direction(*p, g, m, v);
                }
            }
            Optimizer::Lamb => {
                let update: Vec<f32> = p
                    .iter()
                    .zip(g)
                    .zip(m)
                    .zip(v)
                    .map(|(((&p, &g), m), v)| direction(p, g, m, v))
                    .collect();
                // Layer-wise trust ratio ||w|| / ||update||. Like weight decay, it is
                // not applied to biases and LayerNorm parameters (ratio 1 there).
                let ratio = if slot.decays() {
                    let w_norm = l2_norm(p);
                    let u_norm = l2_norm(&update);
                    if w_norm > 0.0 && u_norm > 0.0 {
                        w_norm / u_norm
                    } else {
                        1.0
                    }
                } else {
                    1.0
                };
                for (pi, u) in p.iter_mut().zip(&update) {
                    *pi -= lr * ratio * u;
                }
            }
        }
    }
}

/// Updates one element's moments and returns its Adam direction with decoupled decay.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_direction(
    config: &OptimizerConfig,
    bias1: f32,
    bias2: f32,
    decay: f32,
    p: f32,
    g: f32,
    m: &mut f32,
    v: &mut f32,
) -> f32 {
    *m = config.beta1 * *m + (1.0 - config.beta1) * g;
    *v = config.beta2 * *v + (1.0 - config.beta2) * g * g;
    let m_hat = *m / bias1;
    let v_hat = *v / bias2;
    m_hat / (v_hat.sqrt() + config.epsilon) + decay * p
}

/// Sums of squares in f32 over blocks of 16 lanes (so the loop vectorises), blocks added
/// in f64 (so the sum of 100M squares stays accurate).
fn l2_norm(x: &[f32]) -> f32 {
    x.chunks(4096)
        .map(|block| {
            let mut lanes = [0.0f32; 16];
            let mut groups = block.chunks_exact(16);
            for group in &mut groups {
                for (lane, v) in lanes.iter_mut().zip(group) {
                    *lane += v * v;
                }
            }
            let rest: f32 = groups.remainder().iter().map(|v| v * v).sum();
            (lanes.iter().sum::<f32>() + rest) as f64
        })
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (no-op for
/// `max_norm <= 0`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = l2_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use bertrain_model::ParamSlot;

    fn layout() -> ParamLayout {
        let slot = |name: &str, offset, len| ParamSlot {
            name: name.into(),
            shape: vec![len],
            transposed: false,
            offset,
            len,
        };
        ParamLayout {
            slots: vec![slot("w.weight", 0, 2), slot("w.bias", 2, 1)],
            total: 3,
        }
    }

    /// One LAMB step computed by hand.
    ///
    /// w = [3, 4], g = [1, 2], bias b = 1 with gradient 0.5; β1 0.9, β2 0.999, ε 0, decay 0.1.
    /// Step 1: m̂ = g, v̂ = g², so the Adam direction is sign(g) = [1, 1] (and 1 for b).
    /// update_w = [1, 1] + 0.1 * [3, 4] = [1.3, 1.4]; ||w|| = 5, ||update|| = sqrt(1.69 + 1.96)
    /// = 1.910497; ratio = 2.617120; w' = w - 0.01 * ratio * update
    ///   = [3 - 0.0340226, 4 - 0.0366397] = [2.9659774, 3.9633603].
    /// The bias has no decay and ratio 1: b' = 1 - 0.01 * 1 = 0.99.
    #[test]
    fn lamb_matches_a_hand_computed_step() {
        let config = OptimizerConfig {
            kind: Optimizer::Lamb,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 0.0,
            weight_decay: 0.1,
        };
        let mut params = vec![3.0, 4.0, 1.0];
        let mut state = OptimizerState::new(3);
        update(
            &config,
            &layout(),
            &mut state,
            &mut params,
            &[1.0, 2.0, 0.5],
            0.01,
        );
        let want = [2.9659774, 3.9633603, 0.99];
        for (got, want) in params.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{params:?}");
        }
    }

    /// AdamW step 1 moves every decaying weight by lr * (sign(g) + wd * w).
    #[test]
    fn adamw_first_step_is_sign_plus_decay() {
        let config = OptimizerConfig {
            kind: Optimizer::Adamw,
            epsilon: 0.0,
            ..OptimizerConfig::bert(Optimizer::Adamw, 0.1)
        };
        let mut params = vec![3.0, 4.0, 1.0];
        let mut state = OptimizerState::new(3);
        update(
            &config,
            &layout(),
            &mut state,
            &mut params,
            &[1.0, -2.0, 0.5],
            0.01,
        );
        let want = [3.0 - 0.01 * 1.3, 4.0 - 0.01 * (-1.0 + 0.4), 1.0 - 0.01];
        for (got, want) in params.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{params:?}");
        }
        assert_eq!(state.step, 1);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((l2_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
