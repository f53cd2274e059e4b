//! The cubecl kernels and the model's GPU code path, run without a GPU: on burn-wgpu over
//! Vulkan, which Mesa's lavapipe (Debian's `mesa-vulkan-drivers`) implements on the CPU.
//! Their CUDA is compiled with NVIDIA's NVRTC, as burn-cuda compiles it on a GPU; what only
//! a GPU shows (speed, bf16 arithmetic) is left to `scripts/gpu-check.sh`.
//!
//! Run with `cargo test -p bertrain-model --features wgpu --test cube_kernels`
//! (scripts/test does, after installing lavapipe and NVRTC where they are missing).
#![cfg(feature = "wgpu")]

use bertrain_model::dropout::{
    DropoutOps, KeyedMask, RowKeys, compare_with_host_masks, dropout_with_host_mask,
};
use bertrain_model::fixtures::{max_diff, padded_batch, small_config, values};
use bertrain_model::fused::adamw::{AdamwOps, AdamwStep};
use bertrain_model::fused::layer_norm::{LayerNormOps, add_layer_norm};
use bertrain_model::fused::softmax::attention_softmax;
use bertrain_model::fused::{KERNELS_ENV, cuda_sources};
use bertrain_model::{
    Accumulation, BertForPreTraining, BertForSequenceClassification, ClassificationBatch,
    ParamLayout, Targets, Unpadding, accumulate_grads, flatten_params, init_bert, load_flat_params,
    seed_dropout,
};
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::module::Module;
use burn::nn::LayerNormConfig;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

type Gpu = Autodiff<Wgpu>;
type Cpu = Autodiff<Flex>;

/// Turns the fused op on for the model (read once per process; every test of this file
/// wants it on, so racing writes all write the same).
fn fused_on() {
    // SAFETY: the tests of this binary only ever set this one variable to this one value.
    unsafe { std::env::set_var(KERNELS_ENV, "fused") };
    assert!(
        Gpu::fused_layer_norm(768),
        "{KERNELS_ENV}=fused turns the op on"
    );
    assert!(!Cpu::fused_layer_norm(768), "Flex has no fused kernels");
    assert!(
        !Gpu::fused_layer_norm(8192),
        "rows longer than the kernels keep in shared memory keep burn's LayerNorm"
    );
}

fn tensor<B: Backend, const D: usize>(data: &[f32], shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), &Default::default())
}

fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Dropout keys for `rows` hidden rows: in grid order, or listed at scattered positions.
fn hidden_keys<B: Backend>(rows: usize, listed: bool) -> RowKeys<B> {
    let seq = 16;
    if !listed {
        return RowKeys::grid(2, seq);
    }
    let positions: Vec<u32> = (0..rows as u32).map(|r| 3 * r + 1).collect();
    let ints = positions.iter().map(|&p| i64::from(p)).collect();
    let device = Tensor::from_data(TensorData::new(ints, [rows]), &Default::default());
    RowKeys::listed(2, seq, &positions, device)
}

/// The op on `B`: its output and the gradients of x, the residual, γ and β.
fn layer_norm_op<B: bertrain_model::TrainingBackend>(
    [x, residual, gamma, beta, upstream]: [&[f32]; 5],
    [rows, n]: [usize; 2],
    mask: Option<(bool, u64, f64)>,
) -> (Vec<f32>, [Vec<f32>; 4]) {
    let x = tensor::<B, 2>(x, [rows, n]).require_grad();
    let residual = tensor::<B, 2>(residual, [rows, n]).require_grad();
    let gamma = tensor::<B, 1>(gamma, [n]).require_grad();
    let beta = tensor::<B, 1>(beta, [n]).require_grad();
    let mask = mask.map(|(listed, call, prob)| KeyedMask {
        keys: hidden_keys(rows, listed),
        call,
        prob,
    });
    let y = add_layer_norm(
        x.clone(),
        residual.clone(),
        gamma.clone(),
        beta.clone(),
        1e-12,
        mask.as_ref(),
    );
    let grads = (y.clone() * tensor::<B, 2>(upstream, [rows, n]))
        .sum()
        .backward();
    let grads = [
        flat(x.grad(&grads).unwrap()),
        flat(residual.grad(&grads).unwrap()),
        flat(gamma.grad(&grads).unwrap()),
        flat(beta.grad(&grads).unwrap()),
    ];
    (flat(y), grads)
}

/// The fused op's output and its gradients for x, the residual, γ and β, against burn's
/// `LayerNorm` of `x + residual` and burn's autodiff of it on Flex, for row counts that do
/// not fill the backward's last cube and widths below, at and above a cube's 256 units.
/// Then with dropout on x inside the op (rows in grid order and listed), against burn's
/// `LayerNorm` of `x ⊙ M + residual` with the host's mask `M`: the kernels, and Flex's
/// version of the op.
#[test]
fn fused_layer_norm_matches_burns_layer_norm_and_its_gradients() {
    fused_on();
    let (call, prob) = (0xABCD_0123_4567_89EF_u64, 0.1);
    for ((rows, n), dropout) in [(37, 128), (70, 768), (5, 100), (33, 1024)]
        .into_iter()
        .flat_map(|shape| [None, Some(shape.1 >= 768), Some(shape.1 < 768)].map(|d| (shape, d)))
    {
        let x = values(rows * n, 1, 2.0);
        let residual = values(rows * n, 2, 1.0);
        let gamma: Vec<f32> = values(n, 3, 0.5).iter().map(|v| 1.0 + v).collect();
        let beta = values(n, 4, 0.3);
        let upstream = values(rows * n, 5, 1.0);

        let (xs, rs) = (
            tensor::<Cpu, 2>(&x, [rows, n]),
            tensor::<Cpu, 2>(&residual, [rows, n]),
        );
        let (xs, rs) = (xs.require_grad(), rs.require_grad());
        let mut norm = LayerNormConfig::new(n)
            .with_epsilon(1e-12)
            .init::<Cpu>(&Default::default());
        norm.gamma = norm
            .gamma
            .map(|_| tensor::<Cpu, 1>(&gamma, [n]).require_grad());
        norm.beta = norm
            .beta
            .map(|b| b.map(|_| tensor::<Cpu, 1>(&beta, [n]).require_grad()));
        let dropped = match dropout {
            None => xs.clone(),
            Some(listed) => {
                let keys = hidden_keys::<Flex>(rows, listed);
                let ones = Tensor::<Flex, 2>::ones([rows, n], &Default::default());
                let mask =
                    dropout_with_host_mask(ones.into_primitive().tensor(), &keys, call, prob);
                let mask = Tensor::from_primitive(TensorPrimitive::Float(mask));
                xs.clone() * Tensor::<Cpu, 2>::from_inner(mask)
            }
        };
        let want = norm.forward(dropped + rs.clone());
        let grads = (want.clone() * tensor::<Cpu, 2>(&upstream, [rows, n]))
            .sum()
            .backward();
        let want_grads = [
            flat(xs.grad(&grads).unwrap()),
            flat(rs.grad(&grads).unwrap()),
            flat(norm.gamma.val().grad(&grads).unwrap()),
            flat(norm.beta.as_ref().unwrap().val().grad(&grads).unwrap()),
        ];
        let want = flat(want);

        let inputs = [&x[..], &residual, &gamma, &beta, &upstream];
        let mask = dropout.map(|listed| (listed, call, prob));
        let mut ops = vec![("kernels", layer_norm_op::<Gpu>(inputs, [rows, n], mask))];
        if dropout.is_some() {
            ops.push(("Flex", layer_norm_op::<Cpu>(inputs, [rows, n], mask)));
        }
        for (op, (got, got_grads)) in ops {
            let case = format!("{op}, {rows}x{n}, dropout {dropout:?}");
            let output = max_diff(&want, &got);
            assert!(output < 1e-5, "{case}: outputs differ by {output}");
            for (name, (want, got)) in ["x", "residual", "gamma", "beta"]
                .iter()
                .zip(want_grads.iter().zip(&got_grads))
            {
                // γ's and β's gradients are sums over the rows: their error grows with them.
                let limit = if name.starts_with('x') || *name == "residual" {
                    1e-5
                } else {
                    1e-4
                };
                let diff = max_diff(want, got);
                assert!(
                    diff < limit,
                    "{case}: the gradients of {name} differ by {diff}"
                );
            }
        }
        if dropout.is_some() {
            let zeros = want_grads[0].iter().filter(|&&g| g == 0.0).count();
            assert!(
                zeros > rows * n / 20,
                "x's gradient is masked: {zeros} zeros"
            );
        }
    }
}

/// The softmax kernels against burn's softmax of the scaled, masked scores and burn's
/// autodiff of it (Flex), at row lengths below and above a cube's 256 units, and with more
/// rows than one grid dimension holds (65,535 cubes).
#[test]
fn fused_softmax_matches_burns_softmax_and_its_gradient() {
    fused_on();
    for [batch, heads, seq] in [[2, 3, 37], [2, 2, 300], [300, 4, 64]] {
        let n = batch * heads * seq * seq;
        let scores = values(n, 21, 8.0);
        let upstream = values(n, 22, 1.0);
        // The last quarter of each sequence is padding.
        let bias: Vec<f32> = (0..batch * seq)
            .map(|i| if i % seq >= seq * 3 / 4 { -1e9 } else { 0.0 })
            .collect();
        let shape = [batch, heads, seq, seq];
        let run = |fused: bool| -> (Vec<f32>, Vec<f32>) {
            if fused {
                let s = tensor::<Gpu, 4>(&scores, shape).require_grad();
                let p = attention_softmax(s.clone(), tensor(&bias, [batch, 1, 1, seq]), 8.0);
                let grads = (p.clone() * tensor::<Gpu, 4>(&upstream, shape))
                    .sum()
                    .backward();
                (flat(p), flat(s.grad(&grads).unwrap()))
            } else {
                let s = tensor::<Cpu, 4>(&scores, shape).require_grad();
                let biased = s.clone().div_scalar(8.0) + tensor(&bias, [batch, 1, 1, seq]);
                let p = burn::tensor::activation::softmax(biased, 3);
                let grads = (p.clone() * tensor::<Cpu, 4>(&upstream, shape))
                    .sum()
                    .backward();
                (flat(p), flat(s.grad(&grads).unwrap()))
            }
        };
        let (want, want_grad) = run(false);
        let (got, got_grad) = run(true);
        let probs = max_diff(&want, &got);
        assert!(probs < 1e-6, "{shape:?}: probabilities differ by {probs}");
        let grad = max_diff(&want_grad, &got_grad);
        assert!(grad < 1e-6, "{shape:?}: gradients differ by {grad}");
        assert!(want_grad.iter().any(|g| g.abs() > 1e-3), "gradients flow");
    }
}

/// Attention's softmax with its dropout in the same kernels, and Flex's version of the op
/// (softmax, then the host's masks), against burn's softmax times the host's mask and
/// burn's autodiff of that (Flex): the probabilities under the mask and the scores'
/// gradient, at row lengths below and above a cube's units.
#[test]
fn softmax_with_dropout_matches_burns_softmax_under_the_host_mask() {
    use bertrain_model::fused::softmax::attention_softmax_dropout;
    fused_on();
    let (call, prob) = (0xFEED_F00D_1234_5678_u64, 0.1);
    for [batch, heads, seq] in [[2, 3, 37], [2, 2, 300]] {
        let n = batch * heads * seq * seq;
        let scores = values(n, 31, 8.0);
        let upstream = values(n, 32, 1.0);
        let bias: Vec<f32> = (0..batch * seq)
            .map(|i| if i % seq >= seq * 3 / 4 { -1e9 } else { 0.0 })
            .collect();
        let shape = [batch, heads, seq, seq];
        let first = 7 * heads as u64;
        fn fused<B: bertrain_model::TrainingBackend>(
            scores: &[f32],
            bias: &[f32],
            upstream: &[f32],
            shape: [usize; 4],
            first: u64,
            (call, prob): (u64, f64),
        ) -> (Vec<f32>, Vec<f32>) {
            let [batch, _, seq, _] = shape;
            let s = tensor::<B, 4>(scores, shape).require_grad();
            let keys = RowKeys::<B>::grid(first, seq);
            let mask = KeyedMask { keys, call, prob };
            let bias = tensor(bias, [batch, 1, 1, seq]);
            let p = attention_softmax_dropout(s.clone(), bias, 8.0, &mask);
            let grads = (p.clone() * tensor::<B, 4>(upstream, shape))
                .sum()
                .backward();
            (flat(p), flat(s.grad(&grads).unwrap()))
        }
        let (want, want_grad) = {
            let s = tensor::<Cpu, 4>(&scores, shape).require_grad();
            let biased = s.clone().div_scalar(8.0) + tensor(&bias, [batch, 1, 1, seq]);
            let keys = RowKeys::<Flex>::grid(first, seq);
            let ones = Tensor::<Flex, 4>::ones(shape, &Default::default());
            let mask =
                dropout_with_host_mask::<Flex>(ones.into_primitive().tensor(), &keys, call, prob);
            let mask =
                Tensor::<Cpu, 4>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(mask)));
            let p = burn::tensor::activation::softmax(biased, 3) * mask;
            let grads = (p.clone() * tensor::<Cpu, 4>(&upstream, shape))
                .sum()
                .backward();
            (flat(p), flat(s.grad(&grads).unwrap()))
        };
        let dropped = (0..n)
            .filter(|&i| i % seq < seq * 3 / 4 && want[i] == 0.0)
            .count();
        assert!(
            dropped > n / 20,
            "some attended probabilities are dropped: {dropped}"
        );
        for (name, (got, got_grad)) in [
            (
                "kernels",
                fused::<Gpu>(&scores, &bias, &upstream, shape, first, (call, prob)),
            ),
            (
                "Flex",
                fused::<Cpu>(&scores, &bias, &upstream, shape, first, (call, prob)),
            ),
        ] {
            let probs = max_diff(&want, &got);
            assert!(
                probs < 1e-6,
                "{name}, {shape:?}: dropped probabilities differ by {probs}"
            );
            let grad = max_diff(&want_grad, &got_grad);
            assert!(grad < 1e-6, "{name}, {shape:?}: gradients differ by {grad}");
        }
    }
}

/// The AdamW kernel gives burn's ops' step (Flex), over more elements than one row of
/// cubes holds and not a multiple of a cube.
#[test]
fn fused_adamw_matches_burns_ops() {
    fused_on();
    let n = 70_001;
    let step = AdamwStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-6,
        weight_decay: 0.01,
        bias1: 1.0 - 0.9f32.powi(7),
        bias2: 1.0 - 0.999f32.powi(7),
    };
    let params = values(n, 11, 0.1);
    let exp_avg = values(n, 12, 0.01);
    let exp_avg_sq: Vec<f32> = values(n, 13, 1e-4).iter().map(|v| v.abs()).collect();
    let grads = values(n, 14, 0.05);
    let decays: Vec<f32> = (0..n).map(|i| f32::from(i % 3 != 0)).collect();
    let inputs = [&params, &exp_avg, &exp_avg_sq, &grads, &decays];
    let [p, m, v, g, d] = inputs.map(|v| tensor::<Flex, 1>(v, [n]));
    let want = Flex::adamw(p, m, v, g, d, &step).map(flat);
    let [p, m, v, g, d] = inputs.map(|v| tensor::<Wgpu, 1>(v, [n]));
    let got = Wgpu::adamw(p, m, v, g, d, &step).map(flat);
    for (name, (got, want)) in ["parameters", "first moments", "second moments"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let diff = max_diff(got, want);
        assert!(diff < 1e-7, "{name} differ by {diff}");
    }
    assert!(
        max_diff(&want[0], &params) > 1e-4,
        "the step moves the parameters"
    );
}

/// The loss, the logits and every parameter's gradient, flat.
/// What one training step computed: its loss, its logits and every parameter's gradient.
struct Step {
    loss: f32,
    logits: Vec<f32>,
    grads: Vec<f32>,
}

impl Step {
    fn of<B: bertrain_model::TrainingBackend, M: Module<B>>(
        model: &M,
        loss: Tensor<B, 1>,
        logits: Vec<f32>,
    ) -> Step {
        let layout = ParamLayout::of(model);
        let mut grads = vec![0.0; layout.total + 1];
        accumulate_grads(
            model,
            &loss.clone().backward(),
            &layout,
            &mut grads,
            Accumulation::Overwrite,
        );
        Step {
            loss: flat(loss)[0],
            logits,
            grads,
        }
    }

    /// `self` (the CPU's) and `other` (the cubecl backend's) agree within 1e-4.
    fn assert_matches(&self, other: Step) {
        assert!(self.grads.iter().any(|g| g.abs() > 1e-3), "gradients flow");
        let (a, b) = (self.loss, other.loss);
        assert!((a - b).abs() < 1e-4, "losses {a} and {b}");
        let logits = max_diff(&self.logits, &other.logits);
        assert!(logits < 1e-4, "logits differ by {logits}");
        let grads = max_diff(&self.grads, &other.grads);
        assert!(grads < 1e-4, "gradients differ by {grads}");
    }
}

/// A pretraining step of BERT.
fn step<B: bertrain_model::TrainingBackend>(model: &BertForPreTraining<B>) -> Step {
    let (batch, unpadding) = padded_batch::<B>(&Default::default());
    let output = model.forward_unpadded(&batch, &unpadding);
    let loss = model.loss(&output, &batch).loss;
    let mut logits = flat(output.mlm_logits);
    logits.extend(flat(output.nsp_logits));
    Step::of(model, loss, logits)
}

/// The keyed dropout kernel draws, bit for bit, the masks the host draws for the same rows
/// and stream value: for rows in grid order and listed ones, rows whose length is not a
/// multiple of four, and through autodiff (the gradient is the upstream one, masked alike).
#[test]
fn keyed_dropout_kernel_draws_the_host_masks() {
    fused_on();
    assert!(Gpu::keyed_dropout_kernel());
    let device = Default::default();
    let positions = [0u32, 3, 8, 13, 20, 22];
    let listed = || {
        let ints = positions.iter().map(|&p| i64::from(p)).collect();
        let t = Tensor::<Wgpu, 1, Int>::from_data(TensorData::new(ints, [6]), &device);
        RowKeys::<Wgpu>::listed(4, 7, &positions, t)
    };
    let cases: [(RowKeys<Wgpu>, Vec<usize>); 4] = [
        (RowKeys::grid(3, 7), vec![5, 7, 64]),
        (RowKeys::grid(6, 9), vec![2, 3, 9, 9]),
        (listed(), vec![6, 130]),
        (RowKeys::grid(11, 1).with_offset(u32::MAX), vec![4, 33]),
    ];
    for (i, (keys, shape)) in cases.into_iter().enumerate() {
        let len = shape.iter().product();
        let x = values(len, i as u64, 1.0);
        let input = || {
            Tensor::<Wgpu, 1>::from_data(TensorData::new(x.clone(), [len]), &device)
                .into_primitive()
                .tensor()
        };
        let reshape = |t| <Wgpu>::float_reshape(t, burn::tensor::Shape::from(shape.as_slice()));
        for (prob, call) in [(0.1, 0x0123_4567_89AB_CDEF_u64), (0.5, u64::MAX - 2)] {
            let got = <Wgpu>::keyed_dropout(reshape(input()), &keys, call, prob);
            let want = dropout_with_host_mask::<Wgpu>(reshape(input()), &keys, call, prob);
            let [got, want] = [got, want].map(|t| {
                flat(Tensor::<Wgpu, 1>::from_primitive(TensorPrimitive::Float(
                    <Wgpu>::float_reshape(t, [len].into()),
                )))
            });
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(
                differ, 0,
                "case {i}, prob {prob}: {differ} of {len} elements differ"
            );
            let dropped = got.iter().filter(|&&v| v == 0.0).count() as f64 / len as f64;
            assert!(
                (dropped - prob).abs() < 0.2,
                "case {i}: dropped {dropped} at {prob}"
            );
        }
    }

    // Through autodiff, as `bench dense` checks it on a GPU: dx is dy under the same mask.
    let c = compare_with_host_masks::<Gpu>(&device, [33, 70], 0.3, 0).unwrap();
    assert_eq!(c.errors, [0.0, 0.0], "y and dx against the host's masks");
}

/// The model on a cubecl backend takes its GPU code path: rows placed in groups of 64, the
/// gathers around attention, the MLM decoder over a vocabulary padded to a multiple of 64,
/// and the fused LayerNorm, softmax and dropout ops. It computes what the CPU path
/// computes, dropout included: the kernel draws the CPU's masks.
#[test]
fn bert_on_a_cubecl_backend_matches_the_cpu() {
    fused_on();
    let config = small_config(0.1);
    let cpu = init_bert::<Cpu>(&config, 3, &Default::default());
    let params = flatten_params(&cpu);
    let gpu = BertForPreTraining::<Gpu>::new(&config, &Default::default());
    let layout = ParamLayout::of(&gpu);
    let gpu = load_flat_params(gpu, &params, &layout);

    seed_dropout(17, 0);
    let on_cpu = step(&cpu);
    seed_dropout(17, 0);
    on_cpu.assert_matches(step(&gpu));
}

/// A fine-tuning step of the classifier (`bertrain finetune`'s model), its loss over three
/// classes.
fn classifier_step<B: bertrain_model::TrainingBackend>(
    model: &BertForSequenceClassification<B>,
) -> Step {
    let device = Default::default();
    let (batch, _) = padded_batch::<B>(&device);
    let mask: Vec<i64> = batch
        .attention_mask
        .to_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let unpadding = Unpadding::new(&mask, batch.input_ids.dims(), &[]);
    let batch = ClassificationBatch {
        input_ids: batch.input_ids,
        token_type_ids: batch.token_type_ids,
        attention_mask: batch.attention_mask,
    };
    let labels = Tensor::from_data(TensorData::new(vec![2i64, 0, 1, 2], [4]), &device);
    let logits = model.forward(&batch, &unpadding);
    let loss = model.loss(logits.clone(), &Targets::Classes(labels));
    Step::of(model, loss, flat(logits))
}

/// The classifier of `bertrain finetune` takes the GPU code path on the cubecl backend (the
/// [CLS] rows gathered from the unpadded encoder, the pooler, the pooled rows' keyed
/// dropout) and gives the CPU's logits, loss and gradients, dropout 0.1 included.
#[test]
fn classifier_on_a_cubecl_backend_matches_the_cpu() {
    fused_on();
    let config = small_config(0.1);
    let cpu = BertForSequenceClassification::<Cpu>::new(&config, 3, &Default::default());
    let layout = ParamLayout::of(&cpu);
    let params = values(layout.total, 5, 0.05);
    let cpu = load_flat_params(cpu, &params, &layout);
    let gpu = BertForSequenceClassification::<Gpu>::new(&config, 3, &Default::default());
    let gpu = load_flat_params(gpu, &params, &layout);

    seed_dropout(23, 1);
    let on_cpu = classifier_step(&cpu);
    seed_dropout(23, 1);
    on_cpu.assert_matches(classifier_step(&gpu));
}

/// Where NVRTC and the CUDA headers are: a folder with `lib/libnvrtc.so.13` and `include/`.
const NVRTC_ENV: &str = "BERTRAIN_NVRTC";

/// Every kernel, in each variant training launches, compiles for an H100 or H200 with
/// NVIDIA's NVRTC, as burn-cuda compiles it at its first launch on a GPU (same dialect,
/// options and architecture flag; see `cuda_sources`). NVRTC 13 and its headers come from
/// NVIDIA's `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` wheels: scripts/test installs
/// them with pip in `target/nvrtc` and names their `nvidia/cu13` folder in BERTRAIN_NVRTC.
#[test]
fn kernels_compile_for_cuda_with_nvrtc() {
    let dir = std::env::var(NVRTC_ENV).unwrap_or_else(|_| {
        panic!(
            "{NVRTC_ENV} is not set: point it at a folder with lib/libnvrtc.so.13 and include/ \
             (a CUDA 13 toolkit, or the nvidia/cu13 folder of the nvidia-cuda-nvrtc and \
             nvidia-cuda-runtime wheels; scripts/test installs them)"
        )
    });
    // cudarc opens NVRTC by its name, and NVRTC its builtins by theirs; once a library is
    // open by its path, its name finds it.
    let lib = std::path::Path::new(&dir).join("lib");
    let builtins = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{} (from {NVRTC_ENV}): {e}", lib.display()))
        .filter_map(|entry| {
            entry
                .ok()
                .map(|e| e.file_name().to_string_lossy().into_owned())
        })
        .find(|name| name.starts_with("libnvrtc-builtins.so."))
        .unwrap_or_else(|| panic!("no libnvrtc-builtins.so.* in {}", lib.display()));
    for name in [builtins.as_str(), "libnvrtc.so.13"] {
        let path = lib.join(name);
        // SAFETY: NVRTC's initialisers only set up its own state.
        let library = unsafe { libloading::Library::new(&path) }
            .unwrap_or_else(|e| panic!("{} cannot be opened: {e}", path.display()));
        std::mem::forget(library);
    }

    let sources = cuda_sources();
    assert_eq!(sources.len(), 25, "every kernel variant");
    // A kernel added to the file but not to `cuda_sources` would go unchecked.
    let launched = include_str!("../src/fused/cube.rs")
        .matches("#[cube(launch)]")
        .count();
    let mut kernels: Vec<&str> = sources
        .iter()
        .map(|s| s.name.split(' ').next().unwrap())
        .collect();
    kernels.sort();
    kernels.dedup();
    assert_eq!(
        kernels.len(),
        launched,
        "kernels in cuda_sources: {kernels:?}"
    );
    let mut failed = Vec::new();
    for kernel in &sources {
        let options = cudarc::nvrtc::CompileOptions {
            arch: Some("sm_90a"),
            include_paths: vec![format!("{dir}/include")],
            options: vec!["-lineinfo".into()],
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(&kernel.source, options) {
            Ok(ptx) => assert!(
                ptx.to_src().contains(".entry"),
                "{}: NVRTC gave no kernel entry",
                kernel.name
            ),
            Err(e) => failed.push(format!("{}: {e:?}", kernel.name)),
        }
    }
    assert!(failed.is_empty(), "NVRTC refused:\n{}", failed.join("\n\n"));
}
