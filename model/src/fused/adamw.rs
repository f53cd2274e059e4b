//! One AdamW step over the flat f32 master buffers that the worker keeps on the device
//! (`DeviceMaster`): parameters, both moments, gradients, and a 0/1 weight-decay mask. With
//! burn's ops it is about fourteen passes over buffers of the model's size (440 MB each for
//! BERT-base); the cubecl kernel reads the five buffers and writes three, once.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// One step's coefficients.
#[derive(Clone, Copy, Debug)]
pub struct AdamwStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ` at this step.
    pub bias1: f32,
    pub bias2: f32,
}

/// A backend with the AdamW step as one op.
pub trait AdamwOps: Backend {
    /// `[params, exp_avg, exp_avg_sq]` after one step with `grads`, all flat f32; `decays`
    /// is 1 where weight decay applies and 0 elsewhere. Decoupled weight decay, in the
    /// order of operations of the worker's host rule (`optim::update`).
    fn adamw(
        params: Tensor<Self, 1>,
        exp_avg: Tensor<Self, 1>,
        exp_avg_sq: Tensor<Self, 1>,
        grads: Tensor<Self, 1>,
        decays: Tensor<Self, 1>,
        step: &AdamwStep,
    ) -> [Tensor<Self, 1>; 3] {
        adamw_with_burn_ops(params, exp_avg, exp_avg_sq, grads, decays, step)
    }
}

/// [`AdamwOps::adamw`] with burn's ops.
pub fn adamw_with_burn_ops<B: Backend>(
    params: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    g: Tensor<B, 1>,
    decays: Tensor<B, 1>,
    step: &AdamwStep,
) -> [Tensor<B, 1>; 3] {
    let m = exp_avg.mul_scalar(step.beta1) + g.clone().mul_scalar(1.0 - step.beta1);
    let v = exp_avg_sq.mul_scalar(step.beta2) + (g.clone() * g).mul_scalar(1.0 - step.beta2);
    let m_hat = m.clone().div_scalar(step.bias1);
    let v_hat = v.clone().div_scalar(step.bias2);
    let decay = decays.mul_scalar(step.weight_decay) * params.clone();
    let direction = m_hat / v_hat.sqrt().add_scalar(step.epsilon) + decay;
    [params - direction.mul_scalar(step.lr), m, v]
}

impl AdamwOps for burn::backend::Flex {}

/// Training backends carry the op too (the model's backend trait includes it); the step
/// itself runs on the inner backend.
impl<B: AdamwOps, C: CheckpointStrategy> AdamwOps for Autodiff<B, C> {}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    /// The rule, element by element, against the plain formula (one decayed and one
    /// undecayed element).
    #[test]
    fn one_step_is_decoupled_adamw() {
        let device = Default::default();
        let t = |v: [f32; 2]| Tensor::<Flex, 1>::from_data(TensorData::from(v), &device);
        let step = AdamwStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            epsilon: 1e-8,
            weight_decay: 0.01,
            bias1: 1.0 - 0.9f32.powi(3),
            bias2: 1.0 - 0.99f32.powi(3),
        };
        let (p, m, v, g, d) = (
            [1.0, -2.0],
            [0.1, 0.2],
            [0.01, 0.04],
            [0.5, -1.0],
            [1.0, 0.0],
        );
        let [p2, m2, v2] = Flex::adamw(t(p), t(m), t(v), t(g), t(d), &step);
        let got = [p2, m2, v2].map(|x| x.into_data().to_vec::<f32>().unwrap());
        for i in 0..2 {
            let m_new = 0.9 * m[i] + 0.1 * g[i];
            let v_new = 0.99 * v[i] + 0.01 * g[i] * g[i];
            let update =
                (m_new / step.bias1) / ((v_new / step.bias2).sqrt() + 1e-8) + 0.01 * d[i] * p[i];
            let want = [p[i] - 0.1 * update, m_new, v_new];
            for (got, want) in got.iter().map(|x| x[i]).zip(want) {
                assert!((got - want).abs() < 1e-6, "element {i}: {got} != {want}");
            }
        }
    }
}
