//! The dense op's products on cuBLASLt, for burn-cuda: operands in the model's float type
//! (bf16 or f32) read in place from burn's buffers, f32 accumulation, the bias added by
//! the forward product's epilogue and the bias gradient by the weight gradient's
//! (`BIAS`, `BGRADA`: see [`super::lt::DensePlan`]). The erf GELU and its gradient stay
//! burn's element-wise kernels.
//!
//! Opt-in (`BERTRAIN_DENSE=cublaslt`) until `scripts/gpu-smoke.sh` has shown on a GPU that
//! it matches burn's ops. cubecl-cuda does not expose its stream, so each call waits for
//! burn's queued work before and for its own stream after (correct first; overlapping
//! comes with a shared stream).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::Cuda;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use super::lt::{DensePlan, Epilogue, LtCall, Product};
use super::{Activation, burn_backward, burn_forward, pre_activation_gradient};

/// The environment variable that turns the cuBLASLt products on.
pub const DENSE_ENV: &str = "BERTRAIN_DENSE";

/// Whether `BERTRAIN_DENSE=cublaslt` is set (read once per process).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(DENSE_ENV).is_ok_and(|v| v == "cublaslt"))
}

/// One line naming the library and where to get it when the products are on and
/// libcublasLt cannot be opened (cudarc would panic on first use).
pub fn check_library() -> Result<(), String> {
    // SAFETY: only probes whether the library can be opened.
    if enabled() && !unsafe { sys::is_culib_present() } {
        return Err(format!(
            "{DENSE_ENV}=cublaslt needs libcublasLt.so (CUDA 13: libcublasLt.so.13), which was not found; \
             install the CUDA toolkit or `pip install nvidia-cublas`, and add the directory holding \
             libcublasLt.so.13 to LD_LIBRARY_PATH (or unset {DENSE_ENV})"
        ));
    }
    Ok(())
}

type Primitive = FloatTensor<Cuda>;

pub(super) fn forward(
    x: Primitive,
    w: Primitive,
    b: Primitive,
    act: Activation,
) -> (Primitive, Option<Primitive>) {
    if !usable(&[&x, &w, &b]) || act == Activation::GeluTanh {
        return burn_forward::<Cuda>(x, w, b, act);
    }
    let ([rows, d_in], d_out) = (dims2(&x), dims2(&w)[1]);
    let plan = DensePlan::new(act, Activation::Identity);
    let [forward, ..] = DensePlan::products(rows, d_in, d_out);
    let y = empty(&x, [rows, d_out]);
    // The row-major B (the weight) is cuBLASLt's A.
    run(&forward, plan.forward, &w, &x, &y, Some(&b));
    match act {
        Activation::Identity => (y, None),
        _ => {
            let pre = y;
            let out = super::activation::<Cuda>(super::float(pre.clone()), act);
            (out.into_primitive().tensor(), Some(pre))
        }
    }
}

pub(super) fn backward(
    x: Primitive,
    w: Primitive,
    pre: Option<Primitive>,
    dy: Primitive,
    act: Activation,
) -> [Primitive; 3] {
    if !usable(&[&x, &w, &dy]) || act == Activation::GeluTanh {
        return burn_backward::<Cuda>(x, w, pre, dy, act);
    }
    let dz = pre_activation_gradient::<Cuda>(pre, dy, act)
        .into_primitive()
        .tensor();
    if !usable(&[&dz]) {
        return burn_backward::<Cuda>(x, w, None, dz, Activation::Identity);
    }
    let ([rows, d_in], d_out) = (dims2(&x), dims2(&w)[1]);
    let plan = DensePlan::new(act, Activation::Identity);
    let [_, weight_gradient, input_gradient] = DensePlan::products(rows, d_in, d_out);
    let dx = empty(&x, [rows, d_in]);
    let dw = empty(&x, [d_in, d_out]);
    let db = empty(&x, [d_out]);
    run(&input_gradient, plan.input_gradient, &w, &dz, &dx, None);
    run(
        &weight_gradient,
        plan.weight_gradient,
        &dz,
        &x,
        &dw,
        Some(&db),
    );
    [dx, dw, db]
}

/// `op(a) · op(b)` for `[batch, rows, cols]` tensors as one strided-batched call (the
/// attention products). Operands are made contiguous first: the model's per-head views
/// of Q, K and V are strided.
pub(super) fn batched(
    a: Primitive,
    a_transposed: bool,
    b: Primitive,
    b_transposed: bool,
) -> Primitive {
    let (a, b) = (into_contiguous(a), into_contiguous(b));
    if !usable(&[&a, &b]) {
        return super::burn_batched_matmul::<Cuda>(a, a_transposed, b, b_transposed);
    }
    let dims3 = |t: &Primitive| {
        let shape = t.meta.shape();
        [shape[0], shape[1], shape[2]]
    };
    let ([batch, a_rows, a_cols], [_, b_rows, b_cols]) = (dims3(&a), dims3(&b));
    let product = Product::batched(
        batch,
        [a_rows, a_cols],
        a_transposed,
        [b_rows, b_cols],
        b_transposed,
    )
    .unwrap_or_else(|e| panic!("batched product: {e}"));
    let c = empty(&a, [batch, product.c.rows, product.c.cols]);
    // The row-major B is cuBLASLt's A.
    run(&product, Epilogue::Default, &b, &a, &c, None);
    c
}

/// Contiguous, on one device, in bf16 or f32 alike: what the calls below read in place.
fn usable(tensors: &[&Primitive]) -> bool {
    let dtype = tensors[0].dtype;
    tensors
        .iter()
        .all(|t| t.is_contiguous() && t.dtype == dtype && t.device == tensors[0].device)
        && matches!(dtype, DType::BF16 | DType::F32)
}

fn dims2(t: &Primitive) -> [usize; 2] {
    let shape = t.meta.shape();
    [shape[0], shape[1]]
}

fn empty<const D: usize>(like: &Primitive, shape: [usize; D]) -> Primitive {
    let dtype = match like.dtype {
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    };
    <Cuda as FloatTensorOps<Cuda>>::float_empty(Shape::from(shape), &like.device, dtype)
}

/// One `cublasLtMatmul` for the row-major `product`: `lt_a` and `lt_b` are cuBLASLt's A and
/// B (the row-major product's B and A), `vector` the bias (`Bias`) or the bias gradient
/// (`BGradA`/`BGradB`).
fn run(
    product: &super::lt::Product,
    epilogue: Epilogue,
    lt_a: &Primitive,
    lt_b: &Primitive,
    d: &Primitive,
    vector: Option<&Primitive>,
) {
    let call = LtCall::of(product).unwrap_or_else(|e| panic!("dense op: {e}"));
    if let Err(e) = epilogue.check(&call) {
        panic!("dense op: {e}");
    }
    <Cuda as Backend>::sync(&d.device)
        .expect("waiting for burn's kernels before a cuBLASLt product");
    let ptr = |t: &Primitive| {
        let resource = t
            .client
            .get_resource(t.handle.clone())
            .expect("a burn-cuda buffer's device memory");
        let ptr = resource.resource().ptr;
        (ptr, resource)
    };
    let (a, _a) = ptr(lt_a);
    let (b, _b) = ptr(lt_b);
    let (dp, _d) = ptr(d);
    let vector = vector.map(ptr);
    let element = match d.dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        _ => sys::cudaDataType_t::CUDA_R_32F,
    };
    let mut handles = handles().lock().unwrap_or_else(|e| e.into_inner());
    let lt = handles
        .entry(d.device.index)
        .or_insert_with(|| Lt::new(d.device.index));
    // SAFETY: the layouts describe exactly the buffers behind the pointers (checked
    // contiguous, sized by `call`), which stay alive (the resource guards) until the
    // stream is synchronised below.
    unsafe {
        lt.matmul(
            &call,
            epilogue,
            element,
            a,
            b,
            dp,
            vector.as_ref().map(|v| v.0),
        )
    }
    .unwrap_or_else(|e| panic!("cuBLASLt matmul ({call:?}, {epilogue:?}): {e:?}"));
    lt.stream
        .synchronize()
        .expect("waiting for a cuBLASLt product");
}

fn handles() -> &'static Mutex<HashMap<usize, Lt>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}

/// A cuBLASLt handle with its stream and workspace, one per GPU, and the algorithm
/// chosen for each call it has seen.
struct Lt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    algorithms: HashMap<AlgorithmKey, sys::cublasLtMatmulAlgo_t>,
}

/// What cuBLASLt's algorithm choice depends on: the call's shapes and transposes, its
/// epilogue, the element type and the alignment of A, B and D.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AlgorithmKey {
    call: LtCall,
    epilogue: Epilogue,
    element: sys::cudaDataType,
    alignments: [u32; 3],
}

// SAFETY: the handle is used under the mutex of `handles` only.
unsafe impl Send for Lt {}

/// NVIDIA's recommended workspace for Hopper (4 MiB suffices before it).
const WORKSPACE_BYTES: usize = 32 << 20;

impl Lt {
    fn new(index: usize) -> Lt {
        let context = CudaContext::new(index).expect("the CUDA context of burn's device");
        let stream = context.new_stream().expect("a CUDA stream for cuBLASLt");
        // SAFETY: the workspace is scratch memory cuBLASLt writes before reading.
        let workspace =
            unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.expect("cuBLASLt's workspace");
        let handle = result::create_handle().expect("a cuBLASLt handle");
        Lt {
            handle,
            stream,
            workspace,
            algorithms: HashMap::new(),
        }
    }

    unsafe fn matmul(
        &mut self,
        call: &LtCall,
        epilogue: Epilogue,
        element: sys::cudaDataType,
        a: u64,
        b: u64,
        d: u64,
        vector: Option<u64>,
    ) -> Result<(), result::CublasError> {
        use cudarc::driver::DevicePtr;
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let layout = |m: super::lt::ColumnMajor| -> Result<Layout, result::CublasError> {
            let layout = Layout(result::create_matrix_layout(
                element,
                m.rows as u64,
                m.cols as u64,
                m.ld as i64,
            )?);
            if call.batch > 1 {
                let count = call.batch as i32;
                let stride = m.batch_stride as i64;
                unsafe {
                    result::set_matrix_layout_attribute(
                        layout.0,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count) as *const i32 as *const c_void,
                        size_of::<i32>(),
                    )?;
                    result::set_matrix_layout_attribute(
                        layout.0,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride) as *const i64 as *const c_void,
                        size_of::<i64>(),
                    )?;
                }
            }
            Ok(layout)
        };
        let (a_layout, b_layout, d_layout) = (layout(call.a)?, layout(call.b)?, layout(call.d)?);
        let desc = Desc(result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?);
        let set = |attr: Attr, value: *const c_void, size: usize| unsafe {
            result::set_matmul_desc_attribute(desc.0, attr, value, size)
        };
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let (trans_a, trans_b) = (i32::from(call.trans_a), i32::from(call.trans_b));
        set(
            Attr::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans_a) as *const _ as *const c_void,
            size_of_val(&trans_a),
        )?;
        set(
            Attr::CUBLASLT_MATMUL_DESC_TRANSB,
            (&trans_b) as *const _ as *const c_void,
            size_of_val(&trans_b),
        )?;
        let lt_epilogue = match epilogue {
            Epilogue::Default => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BGradA => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADA,
            Epilogue::BGradB => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
            Epilogue::GeluAuxBias | Epilogue::DGeluBGrad => {
                unreachable!("the tanh GELU is computed by burn's ops on this backend")
            }
        };
        set(
            Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&lt_epilogue) as *const _ as *const c_void,
            size_of_val(&lt_epilogue),
        )?;
        if let Some(vector) = vector.as_ref() {
            set(
                Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                vector as *const u64 as *const c_void,
                size_of::<u64>(),
            )?;
        }
        // The heuristic assumes 256-byte aligned buffers unless told otherwise, and a
        // tensor may start inside an allocation: say what the pointers give.
        let alignments = [a, b, d].map(super::lt::alignment_of);
        let key = AlgorithmKey {
            call: *call,
            epilogue,
            element,
            alignments,
        };
        let algorithm = match self.algorithms.get(&key) {
            Some(algorithm) => *algorithm,
            None => {
                use sys::cublasLtMatmulPreferenceAttributes_t as PrefAttr;
                let pref = Pref(result::create_matmul_pref()?);
                let set_pref = |attr: PrefAttr, value: *const c_void, size: usize| unsafe {
                    result::set_matmul_pref_attribute(pref.0, attr, value, size)
                };
                let workspace_bytes = WORKSPACE_BYTES;
                set_pref(
                    PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&workspace_bytes) as *const usize as *const c_void,
                    size_of::<usize>(),
                )?;
                for (attr, alignment) in [
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    PrefAttr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ]
                .into_iter()
                .zip([alignments[0], alignments[1], alignments[2], alignments[2]])
                {
                    set_pref(
                        attr,
                        (&alignment) as *const u32 as *const c_void,
                        size_of::<u32>(),
                    )?;
                }
                let heuristic = unsafe {
                    result::get_matmul_algo_heuristic(
                        self.handle,
                        desc.0,
                        a_layout.0,
                        b_layout.0,
                        d_layout.0,
                        d_layout.0,
                        pref.0,
                    )?
                };
                self.algorithms.insert(key, heuristic.algo);
                heuristic.algo
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (workspace, _record) = self.workspace.device_ptr(&self.stream);
        unsafe {
            result::matmul(
                self.handle,
                desc.0,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                a as *const c_void,
                a_layout.0,
                b as *const c_void,
                b_layout.0,
                d as *const c_void,
                d_layout.0,
                d as *mut c_void,
                d_layout.0,
                &algorithm,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);
struct Desc(sys::cublasLtMatmulDesc_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

/// How far cuBLASLt's dense op is from burn's on one shape, and how long each takes.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Largest absolute difference of `y`, `dX`, `dW`, `db` from burn's, each divided by
    /// the largest magnitude of burn's.
    pub errors: [f32; 4],
    /// Mean milliseconds of forward + backward (three products) per path.
    pub burn_ms: f64,
    pub cublaslt_ms: f64,
}

/// Runs the dense op forward and backward on random inputs of `[rows, d_in]` by
/// `[d_in, d_out]` through burn's ops and through cuBLASLt, in the device's current float
/// type, and compares (values and gradients) and times them (`iters` runs after one).
pub fn compare_with_burn(
    device: &burn::backend::cuda::CudaDevice,
    [rows, d_in, d_out]: [usize; 3],
    act: Activation,
    iters: usize,
) -> Result<Comparison, String> {
    use burn::tensor::{Distribution, Tensor};
    let random = |shape: Vec<usize>| -> Primitive {
        let n: usize = shape.iter().product();
        let flat = Tensor::<Cuda, 1>::random([n], Distribution::Normal(0.0, 1.0), device);
        <Cuda as FloatTensorOps<Cuda>>::float_reshape(
            flat.into_primitive().tensor(),
            Shape::from(shape),
        )
    };
    let (x, w, b, dy) = (
        random(vec![rows, d_in]),
        random(vec![d_in, d_out]),
        random(vec![d_out]),
        random(vec![rows, d_out]),
    );
    if !usable(&[&x, &w, &b, &dy]) {
        return Err(format!(
            "the device's float type {:?} is neither bf16 nor f32",
            x.dtype
        ));
    }
    type Path = fn(Primitive, Primitive, Primitive, Primitive, Activation) -> [Primitive; 4];
    let through_burn: Path = |x, w, b, dy, act| {
        let (y, pre) = burn_forward::<Cuda>(x.clone(), w.clone(), b, act);
        let [dx, dw, db] = burn_backward::<Cuda>(x, w, pre, dy, act);
        [y, dx, dw, db]
    };
    let through_lt: Path = |x, w, b, dy, act| {
        let (y, pre) = forward(x.clone(), w.clone(), b, act);
        let [dx, dw, db] = backward(x, w, pre, dy, act);
        [y, dx, dw, db]
    };
    let timed = |path: Path| -> Result<([Primitive; 4], f64), String> {
        let mut out = path(x.clone(), w.clone(), b.clone(), dy.clone(), act);
        <Cuda as Backend>::sync(device).map_err(|e| format!("{e:?}"))?;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            out = path(x.clone(), w.clone(), b.clone(), dy.clone(), act);
        }
        <Cuda as Backend>::sync(device).map_err(|e| format!("{e:?}"))?;
        Ok((
            out,
            start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64,
        ))
    };
    let (reference, burn_ms) = timed(through_burn)?;
    let (fused, cublaslt_ms) = timed(through_lt)?;
    let mut errors = [0f32; 4];
    for (error, (got, want)) in errors.iter_mut().zip(fused.into_iter().zip(reference)) {
        let (got, want) = (
            super::float::<Cuda, 2>(flat(got)),
            super::float::<Cuda, 2>(flat(want)),
        );
        let scalar =
            |t: Tensor<Cuda, 1>| t.into_data().convert::<f32>().to_vec::<f32>().map(|v| v[0]);
        let scale = scalar(want.clone().abs().max()).map_err(|e| format!("{e:?}"))?;
        let diff = scalar((got - want).abs().max()).map_err(|e| format!("{e:?}"))?;
        *error = diff / scale.max(f32::MIN_POSITIVE);
    }
    Ok(Comparison {
        errors,
        burn_ms,
        cublaslt_ms,
    })
}

/// How one batched product compares: [`Comparison`]'s figures for its one output.
#[derive(Debug)]
pub struct BatchedComparison {
    pub error: f32,
    pub burn_ms: f64,
    pub cublaslt_ms: f64,
}

/// Runs `op(a) · op(b)` over `batch` random matrices (`op(a)` `m × k`, `op(b)` `k × n`)
/// through burn's `matmul` and through one strided-batched cuBLASLt call, in the device's
/// float type, and compares and times them (`iters` runs after one).
pub fn compare_batched_with_burn(
    device: &burn::backend::cuda::CudaDevice,
    batch: usize,
    [m, k, n]: [usize; 3],
    (a_transposed, b_transposed): (bool, bool),
    iters: usize,
) -> Result<BatchedComparison, String> {
    use burn::tensor::{Distribution, Tensor};
    let random = |shape: [usize; 3]| -> Primitive {
        Tensor::<Cuda, 3>::random(shape, Distribution::Normal(0.0, 1.0), device)
            .into_primitive()
            .tensor()
    };
    let a = random(if a_transposed {
        [batch, k, m]
    } else {
        [batch, m, k]
    });
    let b = random(if b_transposed {
        [batch, n, k]
    } else {
        [batch, k, n]
    });
    type Path = fn(Primitive, bool, Primitive, bool) -> Primitive;
    let timed = |path: Path| -> Result<(Primitive, f64), String> {
        let mut out = path(a.clone(), a_transposed, b.clone(), b_transposed);
        <Cuda as Backend>::sync(device).map_err(|e| format!("{e:?}"))?;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            out = path(a.clone(), a_transposed, b.clone(), b_transposed);
        }
        <Cuda as Backend>::sync(device).map_err(|e| format!("{e:?}"))?;
        Ok((
            out,
            start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64,
        ))
    };
    let (want, burn_ms) = timed(super::burn_batched_matmul::<Cuda>)?;
    let (got, cublaslt_ms) = timed(batched)?;
    let (got, want) = (
        super::float::<Cuda, 2>(flat(got)),
        super::float::<Cuda, 2>(flat(want)),
    );
    let scalar = |t: Tensor<Cuda, 1>| t.into_data().convert::<f32>().to_vec::<f32>().map(|v| v[0]);
    let scale = scalar(want.clone().abs().max()).map_err(|e| format!("{e:?}"))?;
    let diff = scalar((got - want).abs().max()).map_err(|e| format!("{e:?}"))?;
    Ok(BatchedComparison {
        error: diff / scale.max(f32::MIN_POSITIVE),
        burn_ms,
        cublaslt_ms,
    })
}

/// `t` as a `[1, n]` matrix.
fn flat(t: Primitive) -> Primitive {
    let n = t.meta.shape().num_elements();
    <Cuda as FloatTensorOps<Cuda>>::float_reshape(t, Shape::from([1, n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where libcublasLt cannot be opened (any machine without CUDA, as CI's), turning the
    /// products on fails with one line naming the library and the way to point at it.
    /// Runs with `cargo test -p bertrain-model --features cuda`.
    #[test]
    fn a_missing_library_is_one_line_naming_it() {
        // SAFETY: no other test of this crate reads the environment.
        unsafe { std::env::set_var(DENSE_ENV, "cublaslt") };
        assert!(enabled());
        // SAFETY: only probes whether the library can be opened.
        match (check_library(), unsafe { sys::is_culib_present() }) {
            (Ok(()), true) => {}
            (Err(line), false) => {
                assert!(!line.contains('\n'), "{line}");
                assert!(
                    line.contains("libcublasLt.so.13") && line.contains("LD_LIBRARY_PATH"),
                    "{line}"
                );
            }
            (result, present) => panic!("library present: {present}, check: {result:?}"),
        }
    }
}
