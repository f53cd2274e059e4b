//! `bertrain bench dense`: the dense op's cuBLASLt products against burn's own, on a GPU.
//!
//! For the dense layers of BERT-base and BERT-large at 16,384 tokens (128 sequences of
//! 128; the MLM decoder at its 15% masked positions), runs forward and backward (the three products, the bias and the erf GELU)
//! through burn's ops and through cuBLASLt on the same random inputs, and prints how far
//! apart the outputs and the three gradients are (relative to the largest magnitude of
//! burn's) and how long each path takes. Fails when any difference exceeds the float
//! type's tolerance: `scripts/gpu-smoke.sh` runs it before its training jobs. Attention's
//! strided-batched products, and the fused residual + LayerNorm and attention softmax
//! ops, get the same comparison; the keyed dropout kernel is compared with the masks the
//! host draws.

use anyhow::{Result, bail};
use bertrain_coordinator::job::Precision;
use bertrain_model::TrainingBackend;
use bertrain_worker::OnBackend;

/// What to measure.
pub struct DenseBench {
    pub tokens: usize,
    pub iters: usize,
    pub precision: Precision,
}

impl OnBackend for &DenseBench {
    type Output = ();

    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<()> {
        run(self, &device)
    }
}

#[cfg(not(feature = "cuda"))]
fn run<D>(_: &DenseBench, _: &D) -> Result<()> {
    bail!(
        "bench dense compares cuBLASLt's products with burn's on a GPU: build with `--features cuda` and pass --backend cuda"
    )
}

#[cfg(feature = "cuda")]
fn run<D: 'static>(bench: &DenseBench, device: &D) -> Result<()> {
    use bertrain_model::dense::{Activation, compare_with_burn};
    let Some(device) =
        (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()
    else {
        bail!("bench dense runs on a GPU: pass --backend cuda");
    };
    // bf16 rounds each output to 8 bits of mantissa; in f32 only the order of the sums
    // (and cubecl's TF32 products) differ.
    let tolerance = match bench.precision {
        Precision::Bf16 => 2e-2,
        Precision::Fp32 => 5e-3,
    };
    // The MLM decoder runs on the masked positions only (15% of the tokens), over BERT's
    // vocabulary padded as the model pads it.
    let (tokens, masked) = (bench.tokens, (bench.tokens * 15).div_ceil(100));
    let vocab = bertrain_model::bert::padded_vocab::<burn::backend::Cuda>(30522, device);
    let layers = [
        (
            "base query/key/value",
            tokens,
            768,
            3 * 768,
            Activation::Identity,
        ),
        (
            "base attention output",
            tokens,
            768,
            768,
            Activation::Identity,
        ),
        ("base intermediate", tokens, 768, 3072, Activation::GeluErf),
        ("base output", tokens, 3072, 768, Activation::Identity),
        ("base MLM decoder", masked, 768, vocab, Activation::Identity),
        (
            "large query/key/value",
            tokens,
            1024,
            3 * 1024,
            Activation::Identity,
        ),
        (
            "large intermediate",
            tokens,
            1024,
            4096,
            Activation::GeluErf,
        ),
        ("large output", tokens, 4096, 1024, Activation::Identity),
        (
            "large MLM decoder",
            masked,
            1024,
            vocab,
            Activation::Identity,
        ),
    ];
    println!(
        "bench dense: {} tokens, {:?}, GPU {}, mean of {} runs after 1; error = max |cuBLASLt - burn| / max |burn| (tolerance {tolerance})",
        bench.tokens, bench.precision, device.index, bench.iters
    );
    println!(
        "| layer | rows | in → out | error y | dX | dW | db | burn ms | cuBLASLt ms | burn TFLOP/s | cuBLASLt TFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut worst = 0f32;
    for (name, rows, d_in, d_out, act) in layers {
        let c = compare_with_burn(device, [rows, d_in, d_out], act, bench.iters)
            .map_err(|e| anyhow::anyhow!("bench dense, {name}: {e}"))?;
        let tflops = |ms: f64| 3.0 * 2.0 * (rows * d_in * d_out) as f64 / (ms * 1e-3) / 1e12;
        let [y, dx, dw, db] = c.errors;
        println!(
            "| {name} | {rows} | {d_in} → {d_out} | {y:.1e} | {dx:.1e} | {dw:.1e} | {db:.1e} | {:.2} | {:.2} | {:.0} | {:.0} |",
            c.burn_ms,
            c.cublaslt_ms,
            tflops(c.burn_ms),
            tflops(c.cublaslt_ms)
        );
        worst = c.errors.into_iter().fold(worst, f32::max);
    }
    if worst > tolerance {
        bail!(
            "bench dense: cuBLASLt's results differ from burn's by {worst:.1e}, above the {tolerance} tolerance"
        );
    }

    // Attention's products, each one strided-batched call per layer: scores `Q Kᵀ` and
    // context `P V` forward, and the two products of each one's backward, at BERT-base's
    // 12 heads of 64 for the benchmark's tokens in sequences of 128 and of 512.
    println!();
    println!(
        "| attention product | batch | m × k × n | error | burn ms | cuBLASLt ms | burn TFLOP/s | cuBLASLt TFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for seq in [128, 512] {
        let batch = (tokens / seq).max(1) * 12;
        let head = 64;
        let products = [
            ("scores Q Kᵀ", [seq, head, seq], (false, true)),
            ("dQ = dS K", [seq, seq, head], (false, false)),
            ("dK = dSᵀ Q", [seq, seq, head], (true, false)),
            ("context P V", [seq, seq, head], (false, false)),
            ("dP = dO Vᵀ", [seq, head, seq], (false, true)),
            ("dV = Pᵀ dO", [seq, seq, head], (true, false)),
        ];
        for (name, shape, transposes) in products {
            let c = bertrain_model::dense::compare_batched_with_burn(
                device,
                batch,
                shape,
                transposes,
                bench.iters,
            )
            .map_err(|e| anyhow::anyhow!("bench dense, {name} at {seq}: {e}"))?;
            let [m, k, n] = shape;
            let tflops = |ms: f64| 2.0 * (batch * m * k * n) as f64 / (ms * 1e-3) / 1e12;
            println!(
                "| {name}, seq {seq} | {batch} | {m} × {k} × {n} | {:.1e} | {:.2} | {:.2} | {:.0} | {:.0} |",
                c.error,
                c.burn_ms,
                c.cublaslt_ms,
                tflops(c.burn_ms),
                tflops(c.cublaslt_ms)
            );
            worst = worst.max(c.error);
        }
    }
    if worst > tolerance {
        bail!(
            "bench dense: cuBLASLt's attention products differ from burn's by {worst:.1e}, above the {tolerance} tolerance"
        );
    }

    // The fused residual + LayerNorm kernels (bertrain_model::fused::layer_norm) against burn's
    // LayerNorm. burn's bf16 ops round the mean and the variance to bf16 where the kernels
    // keep f32: twice the products' tolerance.
    use bertrain_model::fused::layer_norm::compare_with_burn as compare_layer_norm;
    let tolerance = 2.0 * tolerance;
    println!();
    println!(
        "| add + LayerNorm | rows | width | error y | d(x + r) | dγ | dβ | burn ms | fused ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut worst = 0f32;
    for (name, width) in [("base", 768), ("large", 1024)] {
        type Train = burn::backend::Autodiff<burn::backend::Cuda>;
        let c = compare_layer_norm::<Train>(device, [tokens, width], bench.iters)
            .map_err(|e| anyhow::anyhow!("bench dense, {name} LayerNorm: {e}"))?;
        let [y, ds, dgamma, dbeta] = c.errors;
        println!(
            "| {name} | {tokens} | {width} | {y:.1e} | {ds:.1e} | {dgamma:.1e} | {dbeta:.1e} | {:.2} | {:.2} |",
            c.burn_ms, c.fused_ms
        );
        worst = c.errors.into_iter().fold(worst, f32::max);
    }
    if worst > tolerance {
        bail!(
            "bench dense: the fused LayerNorm differs from burn's by {worst:.1e}, above the {tolerance} tolerance"
        );
    }

    // Attention's softmax (bertrain_model::fused::softmax) at BERT-base's 12 heads, at the
    // benchmark's tokens in sequences of 128 and of 512.
    use bertrain_model::fused::softmax::compare_with_burn as compare_softmax;
    println!();
    println!(
        "| attention softmax | batch × heads × seq² | error P | d(scores) | burn ms | fused ms |"
    );
    println!("|---|---|---|---|---|---|");
    let mut worst = 0f32;
    for seq in [128, 512] {
        type Train = burn::backend::Autodiff<burn::backend::Cuda>;
        let batch = (tokens / seq).max(1);
        let c = compare_softmax::<Train>(device, [batch, 12, seq], bench.iters)
            .map_err(|e| anyhow::anyhow!("bench dense, softmax at {seq}: {e}"))?;
        let [p, ds] = c.errors;
        println!(
            "| base, seq {seq} | {batch} × 12 × {seq}² | {p:.1e} | {ds:.1e} | {:.2} | {:.2} |",
            c.burn_ms, c.fused_ms
        );
        worst = c.errors.into_iter().fold(worst, f32::max);
    }
    if worst > tolerance {
        bail!(
            "bench dense: the fused softmax differs from burn's by {worst:.1e}, above the {tolerance} tolerance"
        );
    }

    // Keyed dropout (bertrain_model::dropout) against the masks the host draws for the same
    // rows: equal but for the rounding of 1 / (1 - p) (f32 in the kernel, bf16 in the
    // reference's mask). Timed against burn's dropout, which draws other masks.
    use bertrain_model::dropout::compare_with_host_masks;
    println!();
    println!("| keyed dropout, p = 0.1 | rows × width | error y | dx | burn ms | kernel ms |");
    println!("|---|---|---|---|---|---|");
    let mut worst = 0f32;
    let probs_rows = (tokens / 128).max(1) * 12 * 128;
    for (name, shape) in [
        ("base hidden", [tokens, 768]),
        ("base attention, seq 128", [probs_rows, 128]),
    ] {
        type Train = burn::backend::Autodiff<burn::backend::Cuda>;
        let c = compare_with_host_masks::<Train>(device, shape, 0.1, bench.iters)
            .map_err(|e| anyhow::anyhow!("bench dense, dropout of {name}: {e}"))?;
        let [y, dx] = c.errors;
        println!(
            "| {name} | {} × {} | {y:.1e} | {dx:.1e} | {:.2} | {:.2} |",
            shape[0], shape[1], c.burn_ms, c.fused_ms
        );
        worst = c.errors.into_iter().fold(worst, f32::max);
    }
    if worst > tolerance {
        bail!(
            "bench dense: the dropout kernel's masks differ from the host's by {worst:.1e}, above the {tolerance} tolerance"
        );
    }
    Ok(())
}
