//! Attention's `softmax(scores / divisor + bias)` over the last dimension as one op with
//! its own backward. burn runs it as a division, a broadcast addition and softmax's max,
//! subtraction, exponential, sum and division, each a pass over the `[batch, heads, seq,
//! seq]` scores (200 MB per layer for BERT-base at 32 × 512 in bf16), and about as many
//! again in its autodiff; a GPU backend runs one kernel each way.
//!
//! The bias (`[batch, 1, 1, seq]`, the padding mask) is a constant: no gradient flows to
//! it. With `P` the probabilities and `dP` their gradient, per row:
//! `d(scores) = P ⊙ (dP − Σ dP ⊙ P) / divisor`.
//!
//! With attention's dropout in the same op ([`SoftmaxOps::attention_softmax_dropout`]), the
//! output is `P ⊙ M` for the keyed mask `M` of [`crate::dropout`], and the backward takes
//! `dP = d(P ⊙ M) ⊙ M`, the mask drawn again: a GPU kernel then writes `P` and `P ⊙ M` in
//! its one pass, and reads `P` and `d(P ⊙ M)` in the backward's.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};

use super::{float, primitive};
use crate::dropout::{DropoutOps, KeyedMask, inner_mask};

/// A backend with attention's softmax as one op. Tensors are `[batch, heads, seq, seq]`
/// but the bias, `[batch, 1, 1, seq]`.
pub trait SoftmaxOps: DropoutOps {
    /// Whether the model should use the op (the backend's own kernels, switched on).
    fn fused_softmax() -> bool {
        false
    }

    /// The probabilities `softmax(scores / divisor + bias)`.
    fn attention_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self> {
        let scores = float::<Self, 4>(scores).div_scalar(divisor) + float::<Self, 4>(bias);
        primitive(softmax(scores, 3))
    }

    /// `d(scores)` from the probabilities and their gradient (the module's formula).
    fn attention_softmax_backward(
        probs: FloatTensor<Self>,
        dprobs: FloatTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self> {
        let probs = float::<Self, 4>(probs);
        let dtype = probs.dtype();
        let probs = probs.cast(DType::F32);
        let dprobs = float::<Self, 4>(dprobs).cast(DType::F32);
        let dot = (dprobs.clone() * probs.clone()).sum_dim(3);
        primitive((probs * (dprobs - dot)).div_scalar(divisor).cast(dtype))
    }

    /// `(P ⊙ M, P)`: the probabilities under attention's keyed dropout `mask` (see
    /// [`crate::dropout`]), and without it (for the backward).
    fn attention_softmax_dropout(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        divisor: f32,
        mask: &KeyedMask<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let probs = Self::attention_softmax(scores, bias, divisor);
        (mask.apply(probs.clone()), probs)
    }

    /// `d(scores)` from the probabilities and the gradient of `P ⊙ M`.
    fn attention_softmax_dropout_backward(
        probs: FloatTensor<Self>,
        ddropped: FloatTensor<Self>,
        divisor: f32,
        mask: &KeyedMask<Self>,
    ) -> FloatTensor<Self> {
        Self::attention_softmax_backward(probs, mask.apply(ddropped), divisor)
    }
}

/// `softmax(scores / divisor + bias)` through the backend's op.
pub fn attention_softmax<B: SoftmaxOps>(
    scores: Tensor<B, 4>,
    bias: Tensor<B, 4>,
    divisor: f32,
) -> Tensor<B, 4> {
    float(B::attention_softmax(
        primitive(scores),
        primitive(bias),
        divisor,
    ))
}

/// `softmax(scores / divisor + bias)` under attention's keyed dropout, through the backend's
/// op (see [`SoftmaxOps::attention_softmax_dropout`]).
pub fn attention_softmax_dropout<B: SoftmaxOps>(
    scores: Tensor<B, 4>,
    bias: Tensor<B, 4>,
    divisor: f32,
    mask: &KeyedMask<B>,
) -> Tensor<B, 4> {
    let (dropped, _) =
        B::attention_softmax_dropout(primitive(scores), primitive(bias), divisor, mask);
    float(dropped)
}

impl SoftmaxOps for burn::backend::Flex {}

#[derive(Debug)]
struct SoftmaxBackward {
    divisor: f32,
}

impl<B: SoftmaxOps> Backward<B, 1> for SoftmaxBackward {
    /// The probabilities.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dprobs = grads.consume::<B>(&ops.node);
        let dscores = B::attention_softmax_backward(ops.state, dprobs, self.divisor);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, dscores);
        }
    }
}

#[derive(Debug)]
struct SoftmaxDropoutBackward<B: Backend> {
    divisor: f32,
    mask: KeyedMask<B>,
}

impl<B: SoftmaxOps> Backward<B, 1> for SoftmaxDropoutBackward<B> {
    /// The probabilities before dropout.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ddropped = grads.consume::<B>(&ops.node);
        let dscores =
            B::attention_softmax_dropout_backward(ops.state, ddropped, self.divisor, &self.mask);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, dscores);
        }
    }
}

impl<B: SoftmaxOps, C: CheckpointStrategy> SoftmaxOps for Autodiff<B, C> {
    fn fused_softmax() -> bool {
        B::fused_softmax()
    }

    fn attention_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        divisor: f32,
    ) -> FloatTensor<Self> {
        let bias = <Self as AutodiffBackend>::inner(bias);
        let prep = SoftmaxBackward { divisor }
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let probs = B::attention_softmax(scores.primitive, bias, divisor);
                prep.finish(probs.clone(), probs)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::attention_softmax(scores.primitive, bias, divisor))
            }
        }
    }

    fn attention_softmax_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: f32,
    ) -> FloatTensor<Self> {
        unreachable!("the autodiff softmax op's backward runs on its inner backend")
    }

    fn attention_softmax_dropout(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        divisor: f32,
        mask: &KeyedMask<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let bias = <Self as AutodiffBackend>::inner(bias);
        let mask = inner_mask(mask);
        let (dropped, probs) = B::attention_softmax_dropout(scores.primitive, bias, divisor, &mask);
        let prep = SoftmaxDropoutBackward { divisor, mask }
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful();
        let dropped = match prep {
            OpsKind::Tracked(prep) => prep.finish(probs.clone(), dropped),
            OpsKind::UnTracked(prep) => prep.finish(dropped),
        };
        // The undropped probabilities stay inside the op: nothing downstream differentiates them.
        (dropped, <Self as AutodiffBackend>::from_inner(probs))
    }

    fn attention_softmax_dropout_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: f32,
        _: &KeyedMask<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("the autodiff softmax op's backward runs on its inner backend")
    }
}

/// Runs the softmax forward and backward on random `[batch, heads, seq, seq]` scores with
/// the last quarter of each sequence masked, through burn's ops and through the backend's
/// op, in the device's float type, and compares and times them (see [`super::compare`]):
/// errors of the probabilities and of the scores' gradient.
pub fn compare_with_burn<B: AutodiffBackend + SoftmaxOps>(
    device: &B::Device,
    [batch, heads, seq]: [usize; 3],
    iters: usize,
) -> Result<super::Comparison<2>, String> {
    use burn::tensor::Distribution;
    let shape = [batch, heads, seq, seq];
    let normal = |scale| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, scale), device);
    let (scores, dprobs) = (normal(8.0), normal(1.0));
    let masked = Tensor::<B, 1, burn::tensor::Int>::arange(0..seq as i64, device)
        .greater_equal_elem((seq * 3 / 4) as i64)
        .float()
        .mul_scalar(-1.0e9);
    let bias = masked.reshape([1, 1, 1, seq]).repeat_dim(0, batch);
    let divisor = 8.0;
    let flat = |t: Tensor<B::InnerBackend, 4>| t.reshape([1, batch * heads * seq * seq]);
    super::compare::<B, 2>(device, iters, |fused| {
        let scores = scores.clone().detach().require_grad();
        let probs = if fused {
            attention_softmax(scores.clone(), bias.clone(), divisor)
        } else {
            softmax(scores.clone().div_scalar(divisor) + bias.clone(), 3)
        };
        let grads = (probs.clone() * dprobs.clone()).sum().backward();
        [
            flat(probs.inner()),
            flat(scores.grad(&grads).expect("scores take part")),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    /// The op and its written-out backward against burn's autodiff of the composed ops,
    /// with a padding mask in the bias.
    #[test]
    fn the_op_is_burns_softmax_of_the_scaled_scores() {
        let device = Default::default();
        <Flex as Backend>::seed(&device, 9);
        let scores = Tensor::<Ad, 4>::random([2, 3, 5, 5], Distribution::Normal(0.0, 3.0), &device);
        let upstream =
            Tensor::<Ad, 4>::random([2, 3, 5, 5], Distribution::Normal(0.0, 1.0), &device);
        let bias =
            Tensor::<Ad, 4>::from_floats([[[[0.0, 0.0, 0.0, -1e9, -1e9]]], [[[0.0; 5]]]], &device);
        let run = |fused: bool| {
            let scores = scores.clone().detach().require_grad();
            let probs = if fused {
                attention_softmax(scores.clone(), bias.clone(), 2.0)
            } else {
                softmax(scores.clone().div_scalar(2.0) + bias.clone(), 3)
            };
            let grads = (probs.clone() * upstream.clone()).sum().backward();
            let values = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
            (values(probs.inner()), values(scores.grad(&grads).unwrap()))
        };
        let (want, want_grad) = run(false);
        let (got, got_grad) = run(true);
        for (a, b) in want.iter().zip(&got).chain(want_grad.iter().zip(&got_grad)) {
            assert!((a - b).abs() < 1e-6, "{a} != {b}");
        }
        assert!(want_grad.iter().any(|g| g.abs() > 1e-2), "gradients flow");
        assert_eq!(got[3], 0.0, "padding gets no weight");
    }

    /// The comparison that `bench dense` runs on a GPU, here on the CPU (where the op is
    /// burn's ops): no difference.
    #[test]
    fn the_comparison_finds_no_difference_on_the_cpu() {
        let c = compare_with_burn::<Ad>(&Default::default(), [2, 2, 9], 0).unwrap();
        assert!(c.errors.iter().all(|&e| e < 1e-6), "{:?}", c.errors);
    }
}
