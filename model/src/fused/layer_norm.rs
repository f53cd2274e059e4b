//! `LayerNorm(x + residual)` over the last dimension as one op with its own backward: the
//! seam where a GPU backend puts one kernel each way in place of the dozens of
//! element-wise and reduction kernels that burn's `LayerNorm` and its autodiff launch per
//! normalisation. BERT adds and normalises this way after every attention output, every
//! feed-forward output and the embeddings.
//!
//! Backends without the kernels (Flex) keep burn's `LayerNorm` in the model, unchanged;
//! they still implement the op with burn's ops (the provided methods), which is the
//! reference the kernels are tested against.
//!
//! The backward, per row, with `x̂` the normalised input and `g = dy ⊙ γ`:
//! `d(x + residual) = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ`, `dγ = Σ_rows dy ⊙ x̂`,
//! `dβ = Σ_rows dy`.
//!
//! In training the op also takes the dropout that BERT applies to `x` (a sublayer's
//! output) before the residual is added: `LayerNorm(x ⊙ M + residual)` with the keyed mask
//! `M` of [`crate::dropout`], and `dx = d(x ⊙ M + residual) ⊙ M`, the mask drawn again.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};

use super::{float, primitive};
use crate::dropout::{DropoutOps, KeyedMask, inner_mask};

/// A backend with `LayerNorm(x + residual)` as one op. All tensors are `[rows, n]` but γ
/// and β, `[n]`.
pub trait LayerNormOps: DropoutOps {
    /// Whether the model should use the op for rows of `row_len` (the backend's own kernels,
    /// switched on, where they take such rows).
    fn fused_layer_norm(_row_len: usize) -> bool {
        false
    }

    /// `(y, stats)`: `y = (s − mean) / σ ⊙ γ + β` for `s = x ⊙ M + residual` (`x` where
    /// there is no `mask`), with `σ = sqrt(var + ε)` per row, and `stats` `[rows, 2]` in
    /// f32: each row's mean and 1/σ, for the backward.
    fn layer_norm_forward(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        mask: Option<&KeyedMask<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let x = match mask {
            Some(mask) => mask.apply(x),
            None => x,
        };
        let s = float::<Self, 2>(x) + float::<Self, 2>(residual);
        let dtype = s.dtype();
        let s = s.cast(DType::F32);
        let mean = s.clone().mean_dim(1);
        let centred = s - mean.clone();
        let variance = centred.clone().powi_scalar(2).mean_dim(1);
        let inverse_std = variance.add_scalar(epsilon).sqrt().recip();
        let normalised = centred * inverse_std.clone();
        let y = normalised * float::<Self, 1>(gamma).cast(DType::F32).unsqueeze()
            + float::<Self, 1>(beta).cast(DType::F32).unsqueeze();
        let stats = Tensor::cat(vec![mean, inverse_std], 1);
        (primitive(y.cast(dtype)), primitive(stats))
    }

    /// `[dx, d(residual), dγ, dβ]` from the output gradient `dy` (the module's formulas;
    /// `dx = d(residual)` where there is no `mask`).
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        mask: Option<&KeyedMask<Self>>,
    ) -> [FloatTensor<Self>; 4] {
        let x = match mask {
            Some(mask) => mask.apply(x),
            None => x,
        };
        let s = float::<Self, 2>(x) + float::<Self, 2>(residual);
        let dtype = s.dtype();
        let gamma = float::<Self, 1>(gamma);
        let gamma_dtype = gamma.dtype();
        let stats = float::<Self, 2>(stats);
        let [rows, _] = stats.dims();
        let mean = stats.clone().slice([0..rows, 0..1]);
        let inverse_std = stats.slice([0..rows, 1..2]);
        let normalised = (s.cast(DType::F32) - mean) * inverse_std.clone();
        let dy = float::<Self, 2>(dy).cast(DType::F32);
        let g = dy.clone() * gamma.cast(DType::F32).unsqueeze();
        let mean_g = g.clone().mean_dim(1);
        let mean_g_normalised = (g.clone() * normalised.clone()).mean_dim(1);
        let ds = (g - mean_g - normalised.clone() * mean_g_normalised) * inverse_std;
        let [_, n] = dy.dims();
        let dgamma = (dy.clone() * normalised).sum_dim(0).reshape([n]);
        let dbeta = dy.sum_dim(0).reshape([n]);
        let ds = primitive(ds.cast(dtype));
        let dx = match mask {
            Some(mask) => mask.apply(ds.clone()),
            None => ds.clone(),
        };
        [
            dx,
            ds,
            primitive(dgamma.cast(gamma_dtype)),
            primitive(dbeta.cast(gamma_dtype)),
        ]
    }
}

/// `LayerNorm(x ⊙ M + residual)` through the backend's op (`x + residual` without a
/// `mask`).
pub fn add_layer_norm<B: LayerNormOps>(
    x: Tensor<B, 2>,
    residual: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
    mask: Option<&KeyedMask<B>>,
) -> Tensor<B, 2> {
    let (y, _) = B::layer_norm_forward(
        x.into_primitive().tensor(),
        residual.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
        epsilon,
        mask,
    );
    float(y)
}

impl LayerNormOps for burn::backend::Flex {}

#[derive(Debug)]
struct LayerNormBackward<B: Backend> {
    mask: Option<KeyedMask<B>>,
}

impl<B: LayerNormOps> Backward<B, 4> for LayerNormBackward<B> {
    /// x, residual, γ and the row statistics.
    type State = [FloatTensor<B>; 4];

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [x, residual, gamma, stats] = ops.state;
        let [dx, ds, dgamma, dbeta] =
            B::layer_norm_backward(x, residual, gamma, stats, dy, self.mask.as_ref());
        let [x, residual, gamma, beta] = ops.parents;
        for (parent, grad) in [(x, dx), (residual, ds), (gamma, dgamma), (beta, dbeta)] {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

impl<B: LayerNormOps, C: CheckpointStrategy> LayerNormOps for Autodiff<B, C> {
    fn fused_layer_norm(row_len: usize) -> bool {
        B::fused_layer_norm(row_len)
    }

    fn layer_norm_forward(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        mask: Option<&KeyedMask<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let mask = mask.map(inner_mask);
        let prep = LayerNormBackward { mask: mask.clone() }
            .prepare::<C>([
                x.node.clone(),
                residual.node.clone(),
                gamma.node.clone(),
                beta.node.clone(),
            ])
            .compute_bound()
            .stateful();
        let (x, residual, gamma) = (x.primitive, residual.primitive, gamma.primitive);
        let (output, stats) = match prep {
            OpsKind::Tracked(prep) => {
                let (y, stats) = B::layer_norm_forward(
                    x.clone(),
                    residual.clone(),
                    gamma.clone(),
                    beta.primitive,
                    epsilon,
                    mask.as_ref(),
                );
                (prep.finish([x, residual, gamma, stats.clone()], y), stats)
            }
            OpsKind::UnTracked(prep) => {
                let (y, stats) = B::layer_norm_forward(
                    x,
                    residual,
                    gamma,
                    beta.primitive,
                    epsilon,
                    mask.as_ref(),
                );
                (prep.finish(y), stats)
            }
        };
        // The statistics stay inside the op: nothing downstream differentiates them.
        (output, <Self as AutodiffBackend>::from_inner(stats))
    }

    fn layer_norm_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: Option<&KeyedMask<Self>>,
    ) -> [FloatTensor<Self>; 4] {
        unreachable!("the autodiff layer-norm op's backward runs on its inner backend")
    }
}

/// Runs `LayerNorm(x + residual)` forward and backward on random `[rows, n]` inputs
/// through burn's ops and through the backend's op, in the device's float type, and
/// compares and times them (see [`super::compare`]): errors of `y`, `d(x + residual)`,
/// `dγ`, `dβ`.
pub fn compare_with_burn<B: AutodiffBackend + LayerNormOps>(
    device: &B::Device,
    [rows, n]: [usize; 2],
    iters: usize,
) -> Result<super::Comparison<4>, String> {
    use burn::tensor::Distribution;
    const EPSILON: f64 = 1e-5;
    let random = |shape: [usize; 2], scale: f64| {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, scale), device)
    };
    let (x, residual, dy) = (
        random([rows, n], 1.0),
        random([rows, n], 1.0),
        random([rows, n], 1.0),
    );
    let gamma = random([1, n], 0.2).add_scalar(1.0).reshape([n]);
    let beta = random([1, n], 0.2).reshape([n]);
    super::compare::<B, 4>(device, iters, |fused| {
        let [x, residual] = [x.clone(), residual.clone()].map(|t| t.detach().require_grad());
        let [gamma, beta] = [gamma.clone(), beta.clone()].map(|t| t.detach().require_grad());
        let y = if fused {
            add_layer_norm(
                x.clone(),
                residual,
                gamma.clone(),
                beta.clone(),
                EPSILON,
                None,
            )
        } else {
            // What burn's `LayerNorm` module runs.
            float(B::layer_norm(
                primitive(x.clone() + residual),
                primitive(gamma.clone()),
                Some(primitive(beta.clone())),
                EPSILON,
            ))
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let ds = x.grad(&grads).expect("x takes part");
        let dgamma = gamma.grad(&grads).expect("γ takes part");
        let dbeta = beta.grad(&grads).expect("β takes part");
        [y.inner(), ds, dgamma.reshape([1, n]), dbeta.reshape([1, n])]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    /// The op's written-out backward (with burn's ops, as on the CPU) is burn's autodiff of
    /// burn's `LayerNorm`: output and gradients, at widths below and above 256.
    #[test]
    fn the_op_is_burns_layer_norm_of_the_sum() {
        let device = Default::default();
        <Flex as Backend>::seed(&device, 5);
        for shape in [[37, 48], [9, 300]] {
            let c = compare_with_burn::<Ad>(&device, shape, 0).unwrap();
            for (what, error) in ["y", "d(x + residual)", "dγ", "dβ"].iter().zip(c.errors) {
                assert!(
                    error < 1e-5,
                    "{shape:?}: {what} differs by {error} (relative)"
                );
            }
        }
    }

    /// x and the residual get the same gradient; without autodiff the op is the function.
    #[test]
    fn both_summands_get_the_gradient() {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::from_floats([[1.0, -2.0, 0.5], [3.0, 0.0, 1.0]], &device);
        let residual = Tensor::<Ad, 2>::from_floats([[0.5, 0.5, -1.0], [1.0, 2.0, -3.0]], &device);
        let gamma = Tensor::<Ad, 1>::from_floats([1.0, 2.0, 0.5], &device);
        let beta = Tensor::<Ad, 1>::from_floats([0.0, 0.1, -0.2], &device);
        let (x, residual) = (x.require_grad(), residual.require_grad());
        let y = add_layer_norm(
            x.clone(),
            residual.clone(),
            gamma.clone(),
            beta.clone(),
            1e-12,
            None,
        );
        let weights = Tensor::<Ad, 2>::from_floats([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]], &device);
        let grads = (y.clone() * weights).sum().backward();
        x.grad(&grads)
            .unwrap()
            .into_data()
            .assert_eq(&residual.grad(&grads).unwrap().into_data(), true);
        // The output against the plain formula, row by row.
        let s = [[1.5f32, -1.5, -0.5], [4.0, 2.0, -2.0]];
        let (g, b) = ([1.0f32, 2.0, 0.5], [0.0f32, 0.1, -0.2]);
        let mut want = Vec::new();
        for row in s {
            let mean = row.iter().sum::<f32>() / 3.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 3.0;
            for i in 0..3 {
                want.push((row[i] - mean) / var.sqrt() * g[i] + b[i]);
            }
        }
        let got: Vec<f32> = y.inner().into_data().to_vec().unwrap();
        for (got, want) in got.iter().zip(&want) {
            assert!((got - want).abs() < 1e-5, "{got} != {want}");
        }
    }
}
