//! The CUDA C++ of this file's kernels, made without a GPU, so that tests can compile it
//! with NVIDIA's NVRTC where no GPU is (`tests/cube_kernels.rs`).
//!
//! burn-cuda compiles a kernel at its first launch: cubecl's CUDA dialect writes C++ and
//! NVRTC compiles it on the machine that runs it. A kernel that cubecl expands but that
//! NVRTC refuses would therefore first fail on a GPU. The launch functions need a device,
//! but a kernel's definition only asks its client for device properties, so here a client
//! of any cubecl runtime defines each kernel as the launches do, and the CUDA dialect
//! compiles the definitions with the options burn-cuda uses on an sm_90 GPU (H100, H200).

use burn::backend::wgpu::WgpuRuntime;
use burn::tensor::DType;
use cubecl::Compiler;
use cubecl::prelude::*;
use cubecl_cpp::cuda::CudaDialect;
use cubecl_cpp::cuda::mma::CudaWmmaCompiler;
use cubecl_cpp::shared::{CompilationOptions, CppCompiler, CppSupportedFeatures};

use super::{
    DropoutArgsCompilationArg, ROWS_PER_CUBE, adamw_kernel, keyed_dropout_kernel,
    layer_norm_backward_kernel, layer_norm_forward_kernel, softmax_backward_kernel, softmax_kernel,
    units,
};

/// A kernel variant's name (kernel, float type, switches) and its CUDA C++.
pub struct CudaSource {
    pub name: String,
    pub source: String,
}

/// Every kernel of [`super`] in each variant that training launches: bf16 and f32 tensors
/// (i32 positions, burn-cuda's int type), with and without dropout, rows in grid order and
/// listed, at BERT-base's widths (768 hidden, 128 positions). burn-wgpu's client answers
/// the definitions' questions about the device.
pub fn cuda_sources() -> Vec<CudaSource> {
    type R = WgpuRuntime;
    let client = &R::client(&Default::default());
    let hidden = units(768);
    let keys = units(128);
    let int = DType::I32;
    let mut sources = Vec::new();
    let mut add = |name: String, definition: KernelDefinition| {
        sources.push(CudaSource {
            name,
            source: compile(definition),
        })
    };
    for dtype in [DType::BF16, DType::F32] {
        for (dropout, listed) in [(false, false), (true, false), (true, true)] {
            let variant = format!(
                "{dtype:?}{}{}",
                if dropout { " dropout" } else { "" },
                if listed { " listed" } else { "" }
            );
            let kernel = layer_norm_forward_kernel::LayerNormForwardKernel::<R>::new(
                settings(hidden),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                mask(),
                hidden,
                768,
                dropout,
                listed,
                [dtype.into(), int.into()],
            );
            add(format!("layer_norm_forward {variant}"), kernel.define());
            let kernel = layer_norm_backward_kernel::LayerNormBackwardKernel::<R>::new(
                settings(hidden),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                mask(),
                hidden,
                768,
                ROWS_PER_CUBE as u32,
                dropout,
                listed,
                [dtype.into(), int.into()],
            );
            add(format!("layer_norm_backward {variant}"), kernel.define());
            if listed {
                continue;
            }
            let kernel = softmax_kernel::SoftmaxKernel::<R>::new(
                settings(keys),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                (),
                mask(),
                keys,
                dropout,
                dtype.into(),
            );
            add(format!("softmax {variant}"), kernel.define());
            let kernel = softmax_backward_kernel::SoftmaxBackwardKernel::<R>::new(
                settings(keys),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                (),
                mask(),
                keys,
                dropout,
                dtype.into(),
            );
            add(format!("softmax_backward {variant}"), kernel.define());
        }
        for listed in [false, true] {
            let kernel = keyed_dropout_kernel::KeyedDropoutKernel::<R>::new(
                settings(256),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                (),
                mask(),
                listed,
                [dtype.into(), int.into()],
            );
            let listed = if listed { " listed" } else { "" };
            add(format!("keyed_dropout {dtype:?}{listed}"), kernel.define());
        }
    }
    let kernel = adamw_kernel::AdamwKernel::<R>::new(
        settings(256),
        client.clone(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
    );
    add("adamw F32".to_string(), kernel.define());
    sources
}

/// What `launch` starts from: the cube's width, 32-bit addresses.
fn settings(units: u32) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(CubeDim::new_1d(units))
        .address_type(AddressType::U32)
}

fn tensor() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

fn mask() -> DropoutArgsCompilationArg {
    DropoutArgsCompilationArg {
        first: (),
        seq: (),
        offset: (),
        call_hi: (),
        call_lo: (),
        drop_below: (),
        keep_scale: (),
    }
}

/// The CUDA dialect's C++ for `definition`, with the options burn-cuda's runtime sets for
/// a device of compute capability 9.0 and CUDA 13, in the checked mode `launch` uses.
fn compile(definition: KernelDefinition) -> String {
    let options = CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            grid_constants: true,
            clusters: true,
            fast_math: true,
            fast_tanh: true,
            elect_sync: true,
        },
    };
    let name = definition.options.kernel_name.clone();
    CppCompiler::<CudaDialect<CudaWmmaCompiler>>::default()
        .compile(
            definition,
            &options,
            ExecutionMode::Checked,
            AddressType::U32.unsigned_type(),
        )
        .unwrap_or_else(|e| panic!("cubecl's CUDA dialect cannot compile {name}: {e:?}"))
        .to_string()
}
