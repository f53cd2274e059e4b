//! Ops that a GPU backend runs as one kernel each where burn's ops launch many: the
//! residual + LayerNorm of every encoder layer ([`layer_norm`]), attention's scaled,
//! masked softmax ([`softmax`]) and the AdamW update over the flat master buffers
//! ([`adamw`]). Each is a trait over `Backend` whose provided
//! methods compute it with burn's ops (what the CPU runs, and the reference the kernels
//! are tested against); [`cube`] implements them with cubecl kernels for burn's cubecl
//! backends (burn-cuda, and burn-wgpu in tests).
//!
//! The kernels are used with `BERTRAIN_KERNELS=fused` only, until `scripts/gpu-check.sh`
//! has shown them on a GPU; `model/tests/cube_kernels.rs` runs them on burn-wgpu over
//! Mesa's lavapipe (Vulkan on the CPU).

pub mod adamw;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "wgpu")]
pub use cube::{CudaSource, cuda_sources};
pub mod layer_norm;
pub mod softmax;

use std::sync::OnceLock;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// The environment variable that switches the kernels on (`fused`), where the backend has
/// them.
pub const KERNELS_ENV: &str = "BERTRAIN_KERNELS";

/// Whether `BERTRAIN_KERNELS=fused` is set (read once per process).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(KERNELS_ENV).is_ok_and(|v| v == "fused"))
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// How a fused op compares with burn's ops on the same random inputs.
#[derive(Debug)]
pub struct Comparison<const N: usize> {
    /// For each output and gradient: the largest absolute difference from burn's, divided
    /// by the largest magnitude of burn's.
    pub errors: [f32; N],
    /// Mean milliseconds of forward + backward per path.
    pub burn_ms: f64,
    pub fused_ms: f64,
}

/// Runs `once(false)` (burn's ops) and `once(true)` (the fused op), each once and then
/// `iters` times timed, and compares their last results (flattened to `[1, len]` or any
/// matrix shape).
fn compare<B: AutodiffBackend, const N: usize>(
    device: &B::Device,
    iters: usize,
    once: impl Fn(bool) -> [Tensor<B::InnerBackend, 2>; N],
) -> Result<Comparison<N>, String> {
    let (reference, burn_ms) = timed::<B, _>(device, iters, || once(false))?;
    let (fused, fused_ms) = timed::<B, _>(device, iters, || once(true))?;
    Ok(Comparison {
        errors: relative_errors(fused, reference)?,
        burn_ms,
        fused_ms,
    })
}

/// `f`'s result after running it once and then `iters` times, and the mean milliseconds of
/// those runs (the device drained before and after).
pub(crate) fn timed<B: Backend, T>(
    device: &B::Device,
    iters: usize,
    f: impl Fn() -> T,
) -> Result<(T, f64), String> {
    let mut out = f();
    B::sync(device).map_err(|e| format!("{e:?}"))?;
    let start = std::time::Instant::now();
    for _ in 0..iters {
        out = f();
    }
    B::sync(device).map_err(|e| format!("{e:?}"))?;
    Ok((
        out,
        start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64,
    ))
}

/// For each pair, the largest absolute difference divided by the largest magnitude of `want`.
pub(crate) fn relative_errors<B: Backend, const N: usize>(
    got: [Tensor<B, 2>; N],
    want: [Tensor<B, 2>; N],
) -> Result<[f32; N], String> {
    let scalar = |t: Tensor<B, 1>| {
        let v = t.into_data().convert::<f32>().to_vec::<f32>();
        v.map(|v| v[0]).map_err(|e| format!("{e:?}"))
    };
    let mut errors = [0f32; N];
    for (error, (got, want)) in errors.iter_mut().zip(got.into_iter().zip(want)) {
        let scale = scalar(want.clone().abs().max())?;
        let diff = scalar((got - want).abs().max())?;
        *error = diff / scale.max(f32::MIN_POSITIVE);
    }
    Ok(errors)
}
