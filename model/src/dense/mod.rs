//! The dense layer `act(x · w + b)` as one op with its own backward: the seam where a GPU
//! backend puts its fused cuBLASLt products ([`lt`] maps them) while every other backend
//! computes the same function with burn's ops.
//!
//! The backward is written out, as the fused products compute it: `dZ = dY ⊙ act'(Z)` at
//! the pre-activation `Z`, then `dX = dZ · wᵀ`, `dw = xᵀ · dZ` and `db = Σ_rows dZ`.

#[cfg(feature = "cuda")]
mod cublaslt;
pub mod lt;

#[cfg(feature = "cuda")]
pub use cublaslt::{
    BatchedComparison, Comparison, DENSE_ENV, check_library as check_cublaslt,
    compare_batched_with_burn, compare_with_burn,
};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::dropout::DropoutOps;
use crate::fused::adamw::AdamwOps;
use crate::fused::layer_norm::LayerNormOps;
use crate::fused::softmax::SoftmaxOps;

pub use lt::Activation;

/// A backend with the dense layer as one op. CPU backends take the provided methods,
/// which are burn's own ops; autodiff wraps any of them with the written-out backward.
/// The other fused ops ([`crate::fused`]) come with it.
pub trait DenseOps: LayerNormOps + SoftmaxOps + AdamwOps + DropoutOps {
    /// `(act(x · w + b), x · w + b)` for `x` `[rows, in]`, `w` `[in, out]`, `b` `[out]`.
    /// The pre-activation is returned only when `act` is not the identity (the backward
    /// needs it; cuBLASLt writes it as the epilogue's aux output).
    fn dense_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        burn_forward::<Self>(x, w, b, act)
    }

    /// `(dX, dw, db)` from the output gradient `dy` (see the module's comment).
    fn dense_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        pre: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        act: Activation,
    ) -> [FloatTensor<Self>; 3] {
        burn_backward::<Self>(x, w, pre, dy, act)
    }

    /// Whether the model should run attention's products through
    /// [`DenseOps::batched_matmul`] (the backend's own products, switched on); burn's
    /// `matmul` otherwise.
    fn batched_products() -> bool {
        false
    }

    /// `op(a) · op(b)` for `[batch, rows, cols]` tensors, where `op(x)` transposes each
    /// matrix when its flag is set: attention's products, one batched call each.
    fn batched_matmul(
        a: FloatTensor<Self>,
        a_transposed: bool,
        b: FloatTensor<Self>,
        b_transposed: bool,
    ) -> FloatTensor<Self> {
        burn_batched_matmul::<Self>(a, a_transposed, b, b_transposed)
    }

    /// `dy ⊙ gelu'(pre)` for the erf GELU, exactly. Provided with burn's element-wise ops
    /// (burn's own `gelu_backward` is by default the tanh form's derivative, which
    /// burn-cuda keeps); Flex's is exact and one pass.
    fn gelu_erf_backward(pre: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_erf_backward_composed::<Self>(pre, dy)
    }
}

/// [`DenseOps::gelu_erf_backward`] with burn's element-wise ops.
fn gelu_erf_backward_composed<B: Backend>(
    pre: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let z = float::<B, 2>(pre);
    // d/dz z Φ(z) = Φ(z) + z φ(z)
    let cdf = (z.clone() * std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        * 0.5;
    let pdf = (z.clone().powi_scalar(2) * -0.5).exp()
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (float::<B, 2>(dy) * (cdf + z * pdf))
        .into_primitive()
        .tensor()
}

/// [`DenseOps::batched_matmul`] with burn's ops.
fn burn_batched_matmul<B: Backend>(
    a: FloatTensor<B>,
    a_transposed: bool,
    b: FloatTensor<B>,
    b_transposed: bool,
) -> FloatTensor<B> {
    let op = |x: FloatTensor<B>, transposed| {
        let x = float::<B, 3>(x);
        if transposed { x.swap_dims(1, 2) } else { x }
    };
    op(a, a_transposed)
        .matmul(op(b, b_transposed))
        .into_primitive()
        .tensor()
}

/// [`DenseOps::dense_forward`] with burn's ops.
fn burn_forward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    b: FloatTensor<B>,
    act: Activation,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let pre = float::<B, 2>(x).matmul(float::<B, 2>(w)) + float::<B, 1>(b).unsqueeze::<2>();
    match act {
        Activation::Identity => (pre.into_primitive().tensor(), None),
        _ => (
            activation(pre.clone(), act).into_primitive().tensor(),
            Some(pre.into_primitive().tensor()),
        ),
    }
}

/// [`DenseOps::dense_backward`] with burn's ops.
fn burn_backward<B: DenseOps>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    pre: Option<FloatTensor<B>>,
    dy: FloatTensor<B>,
    act: Activation,
) -> [FloatTensor<B>; 3] {
    let dz = pre_activation_gradient::<B>(pre, dy, act);
    let dx = dz.clone().matmul(float::<B, 2>(w).transpose());
    let dw = float::<B, 2>(x).transpose().matmul(dz.clone());
    let db = sum_rows(dz);
    [
        dx.into_primitive().tensor(),
        dw.into_primitive().tensor(),
        db.into_primitive().tensor(),
    ]
}

/// `act(z)`, element-wise.
fn activation<B: Backend>(z: Tensor<B, 2>, act: Activation) -> Tensor<B, 2> {
    match act {
        Activation::Identity => z,
        Activation::GeluErf => burn::tensor::activation::gelu(z),
        Activation::GeluTanh => burn::tensor::activation::gelu_approximate(z),
    }
}

/// `dZ = dY ⊙ act'(Z)`.
fn pre_activation_gradient<B: DenseOps>(
    pre: Option<FloatTensor<B>>,
    dy: FloatTensor<B>,
    act: Activation,
) -> Tensor<B, 2> {
    match (pre, act) {
        (None, _) | (_, Activation::Identity) => float::<B, 2>(dy),
        (Some(pre), Activation::GeluErf) => float::<B, 2>(B::gelu_erf_backward(pre, dy)),
        (Some(pre), Activation::GeluTanh) => {
            float::<B, 2>(dy) * gelu_tanh_gradient(float::<B, 2>(pre))
        }
    }
}

/// What the model trains on: autodiff over a backend with the dense op, both having it
/// (evaluation runs on the inner backend).
pub trait TrainingBackend: AutodiffBackend<InnerBackend: DenseOps> + DenseOps {}

impl<B: AutodiffBackend<InnerBackend: DenseOps> + DenseOps> TrainingBackend for B {}

/// `op(a) · op(b)` through the backend's batched product (see
/// [`DenseOps::batched_matmul`]).
pub fn batched_matmul<B: DenseOps>(
    a: Tensor<B, 3>,
    a_transposed: bool,
    b: Tensor<B, 3>,
    b_transposed: bool,
) -> Tensor<B, 3> {
    float(B::batched_matmul(
        a.into_primitive().tensor(),
        a_transposed,
        b.into_primitive().tensor(),
        b_transposed,
    ))
}

/// `act(x · w + b)` through the backend's dense op.
pub fn dense<B: DenseOps>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
    act: Activation,
) -> Tensor<B, 2> {
    let (y, _) = B::dense_forward(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        b.into_primitive().tensor(),
        act,
    );
    float(y)
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `Σ_rows x` for `x` `[rows, n]`, in two stages over runs of [`ROW_RUN`] rows. Why:
/// burn-cuda reduces all the rows into `n` sums with little parallelism (2 to 3.5 ms for
/// 16k rows on an H200); two reductions with many outputs each are fast.
fn sum_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let [rows, n] = x.dims();
    let runs = rows / ROW_RUN;
    if runs < 2 {
        return x.sum_dim(0).reshape([n]);
    }
    let whole = runs * ROW_RUN;
    let head = x
        .clone()
        .slice(0..whole)
        .reshape([runs, ROW_RUN, n])
        .sum_dim(1)
        .sum_dim(0)
        .reshape([n]);
    if whole == rows {
        head
    } else {
        head + x.slice(whole..rows).sum_dim(0).reshape([n])
    }
}

/// Rows per partial sum of [`sum_rows`]: the unpadded encoder's rows come in multiples of
/// it on a GPU.
const ROW_RUN: usize = crate::bert::GPU_ROW_GROUP;

/// The tanh GELU's derivative at `z`: with `u = c (z + a z³)` and `t = tanh u`,
/// `½ (1 + t) + ½ z (1 − t²) c (1 + 3 a z²)`.
fn gelu_tanh_gradient<B: Backend>(z: Tensor<B, 2>) -> Tensor<B, 2> {
    let c = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    let a = 0.044715;
    let square = z.clone().powi_scalar(2);
    let t = ((z.clone() + z.clone() * square.clone() * a) * c).tanh();
    let outer = (t.clone().powi_scalar(2).neg().add_scalar(1.0))
        * z
        * (square * (3.0 * a)).add_scalar(1.0)
        * (0.5 * c);
    t.add_scalar(1.0) * 0.5 + outer
}

impl DenseOps for burn::backend::Flex {
    fn gelu_erf_backward(pre: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::tensor::ops::ActivationOps;
        <Self as ActivationOps<Self>>::gelu_backward(pre, dy)
    }
}

/// burn's ops: the model on burn-wgpu tests the GPU code path without a GPU
/// (`tests/cube_kernels.rs`), attention's products through the batched op (burn's
/// products inside it, its written-out backward around them) when the fused kernels are
/// switched on, as cuBLASLt's are on burn-cuda.
#[cfg(feature = "wgpu")]
impl DenseOps for burn::backend::Wgpu {
    fn batched_products() -> bool {
        crate::fused::enabled()
    }
}

/// cuBLASLt's products with `BERTRAIN_DENSE=cublaslt` (see [`cublaslt`]), burn's ops
/// otherwise.
#[cfg(feature = "cuda")]
impl DenseOps for burn::backend::Cuda {
    fn dense_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if cublaslt::enabled() {
            cublaslt::forward(x, w, b, act)
        } else {
            burn_forward::<Self>(x, w, b, act)
        }
    }

    fn dense_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        pre: Option<FloatTensor<Self>>,
        dy: FloatTensor<Self>,
        act: Activation,
    ) -> [FloatTensor<Self>; 3] {
        if cublaslt::enabled() {
            cublaslt::backward(x, w, pre, dy, act)
        } else {
            burn_backward::<Self>(x, w, pre, dy, act)
        }
    }

    fn batched_products() -> bool {
        cublaslt::enabled()
    }

    fn batched_matmul(
        a: FloatTensor<Self>,
        a_transposed: bool,
        b: FloatTensor<Self>,
        b_transposed: bool,
    ) -> FloatTensor<Self> {
        if cublaslt::enabled() {
            cublaslt::batched(a, a_transposed, b, b_transposed)
        } else {
            burn_batched_matmul::<Self>(a, a_transposed, b, b_transposed)
        }
    }
}

#[derive(Debug)]
struct DenseBackward {
    act: Activation,
}

impl<B: DenseOps> Backward<B, 3> for DenseBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, pre) = ops.state;
        let [dx, dw, db] = B::dense_backward(x, w, pre, dy, self.act);
        for (parent, grad) in ops.parents.into_iter().zip([dx, dw, db]) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

/// `C = op_a(A) · op_b(B)`: `dA = dC · op_b(B)ᵀ` (or its transpose, `op_b(B) · dCᵀ`, when A
/// is transposed), `dB = op_a(A)ᵀ · dC` (or `dCᵀ · op_a(A)`), each again one batched
/// product.
#[derive(Debug)]
struct BatchedBackward {
    a_transposed: bool,
    b_transposed: bool,
}

impl<B: DenseOps> Backward<B, 2> for BatchedBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dc = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        let (a_t, b_t) = (self.a_transposed, self.b_transposed);
        let [a_parent, b_parent] = ops.parents;
        if let Some(parent) = a_parent {
            let da = if a_t {
                B::batched_matmul(b.clone(), b_t, dc.clone(), true)
            } else {
                B::batched_matmul(dc.clone(), false, b.clone(), !b_t)
            };
            grads.register::<B>(parent.id, da);
        }
        if let Some(parent) = b_parent {
            let db = if b_t {
                B::batched_matmul(dc, true, a, a_t)
            } else {
                B::batched_matmul(a, !a_t, dc, false)
            };
            grads.register::<B>(parent.id, db);
        }
    }
}

impl<B: DenseOps, C: CheckpointStrategy> DenseOps for Autodiff<B, C> {
    fn batched_products() -> bool {
        B::batched_products()
    }

    fn batched_matmul(
        a: FloatTensor<Self>,
        a_transposed: bool,
        b: FloatTensor<Self>,
        b_transposed: bool,
    ) -> FloatTensor<Self> {
        let prep = BatchedBackward {
            a_transposed,
            b_transposed,
        }
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful();
        let (a, b) = (a.primitive, b.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let c = B::batched_matmul(a.clone(), a_transposed, b.clone(), b_transposed);
                prep.finish((a, b), c)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::batched_matmul(a, a_transposed, b, b_transposed))
            }
        }
    }

    fn dense_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let prep = DenseBackward { act }
            .prepare::<C>([x.node.clone(), w.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful();
        let (x, w) = (x.primitive, w.primitive);
        let output = match prep {
            OpsKind::Tracked(prep) => {
                let (y, pre) = B::dense_forward(x.clone(), w.clone(), b.primitive, act);
                prep.finish((x, w, pre), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_forward(x, w, b.primitive, act).0),
        };
        // The pre-activation stays inside the op: nothing downstream differentiates it.
        (output, None)
    }

    fn dense_backward(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: Option<FloatTensor<Self>>,
        _: FloatTensor<Self>,
        _: Activation,
    ) -> [FloatTensor<Self>; 3] {
        unreachable!("the autodiff dense op's backward runs on its inner backend")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type Ad = Autodiff<Flex>;

    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Ad, D> {
        let device = Default::default();
        <Flex as Backend>::seed(&device, seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.5), &device).require_grad()
    }

    /// Equal within 1e-5 (absolute and relative): the same function, summed in another
    /// order.
    fn assert_close<B: Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>) {
        let tolerance = Tolerance::<f32>::absolute(1e-5).set_relative(1e-5);
        got.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tolerance);
    }

    /// The op's value and its three gradients equal burn's autodiff of the same function
    /// written with burn's ops, for each activation.
    #[test]
    fn the_op_and_its_backward_match_burns_autodiff() {
        for act in [
            Activation::Identity,
            Activation::GeluErf,
            Activation::GeluTanh,
        ] {
            let (x, w, b) = (random([9, 6], 1), random([6, 4], 2), random([4], 3));
            let upstream = random([9, 4], 4).detach();

            let y = dense(x.clone(), w.clone(), b.clone(), act);
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let fused = [x.grad(&grads).unwrap(), w.grad(&grads).unwrap()];
            let fused_b = b.grad(&grads).unwrap();

            let (x2, w2, b2) = (
                x.detach().require_grad(),
                w.detach().require_grad(),
                b.detach().require_grad(),
            );
            let pre = x2.clone().matmul(w2.clone()) + b2.clone().unsqueeze::<2>();
            let reference = match act {
                Activation::Identity => pre,
                Activation::GeluErf => burn::tensor::activation::gelu(pre),
                Activation::GeluTanh => burn::tensor::activation::gelu_approximate(pre),
            };
            let grads2 = (reference.clone() * upstream).sum().backward();
            assert_close(y, reference);
            for (got, want) in fused
                .into_iter()
                .zip([x2.grad(&grads2).unwrap(), w2.grad(&grads2).unwrap()])
            {
                assert_close(got, want);
            }
            assert_close(fused_b, b2.grad(&grads2).unwrap());
        }
    }

    /// The erf GELU's gradient as burn's element-wise ops compose it (what burn-cuda uses)
    /// equals Flex's own exact one.
    #[test]
    fn the_composed_erf_gelu_gradient_is_exact() {
        let device = Default::default();
        <Flex as Backend>::seed(&device, 7);
        let z = Tensor::<Flex, 2>::random([64, 48], Distribution::Normal(0.0, 2.0), &device);
        let dy = Tensor::<Flex, 2>::random([64, 48], Distribution::Normal(0.0, 1.0), &device);
        let composed = gelu_erf_backward_composed::<Flex>(
            z.clone().into_primitive().tensor(),
            dy.clone().into_primitive().tensor(),
        );
        let exact = <Flex as DenseOps>::gelu_erf_backward(
            z.into_primitive().tensor(),
            dy.into_primitive().tensor(),
        );
        float::<Flex, 2>(composed)
            .into_data()
            .assert_approx_eq::<f32>(
                &float::<Flex, 2>(exact).into_data(),
                Tolerance::absolute(1e-5),
            );
    }

    /// The batched product and its written-out backward against burn's autodiff of
    /// `matmul`, for every combination of transposes.
    #[test]
    fn the_batched_product_and_its_backward_match_burns_autodiff() {
        let (batch, m, k, n) = (3, 4, 5, 2);
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = random(if a_t { [batch, k, m] } else { [batch, m, k] }, 5);
            let b = random(if b_t { [batch, n, k] } else { [batch, k, n] }, 6);
            let upstream = random([batch, m, n], 7).detach();
            let c = batched_matmul(a.clone(), a_t, b.clone(), b_t);
            let grads = (c.clone() * upstream.clone()).sum().backward();
            let got = [a.grad(&grads).unwrap(), b.grad(&grads).unwrap()];
            let (a2, b2) = (a.detach().require_grad(), b.detach().require_grad());
            let op = |x: Tensor<Ad, 3>, t| if t { x.swap_dims(1, 2) } else { x };
            let reference = op(a2.clone(), a_t).matmul(op(b2.clone(), b_t));
            let grads2 = (reference.clone() * upstream).sum().backward();
            assert_close(c, reference);
            for (got, want) in got
                .into_iter()
                .zip([a2.grad(&grads2).unwrap(), b2.grad(&grads2).unwrap()])
            {
                assert_close(got, want);
            }
        }
    }

    /// Without autodiff (evaluation) the op is the plain function.
    #[test]
    fn the_inner_op_is_the_plain_function() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[1.0, -2.0], [0.5, 3.0]], &device);
        let w = Tensor::<Flex, 2>::from_floats([[2.0, 0.0, 1.0], [1.0, -1.0, 0.0]], &device);
        let b = Tensor::<Flex, 1>::from_floats([0.5, 0.25, -1.0], &device);
        let y = dense(x, w, b, Activation::Identity);
        y.into_data().assert_eq(
            &Tensor::<Flex, 2>::from_floats([[0.5, 2.25, 0.0], [4.5, -2.75, -0.5]], &device)
                .into_data(),
            true,
        );
    }
}
