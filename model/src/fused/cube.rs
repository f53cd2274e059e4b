//! The fused ops' kernels for burn's cubecl backends (burn-cuda, and burn-wgpu in tests).
//!
//! LayerNorm, one pass over the rows forward and one backward, both accumulating in f32
//! whatever the tensors' float type. Forward: one cube per row; the row's sum and then its
//! squared deviations are reduced in shared memory, and the normalised row is written with
//! γ and β applied. The row's mean and 1/σ are kept for the backward (8 bytes a row).
//! The first pass keeps the row's `x ⊙ M + residual` in shared memory for the others, so
//! the inputs are read and the mask drawn once.
//!
//! Backward: one cube per [`ROWS_PER_CUBE`] rows, by the formula of [`super::layer_norm`].
//! Each unit also sums `dy ⊙ x̂` and `dy` over the cube's rows for its own columns, so γ's
//! and β's gradients leave the kernel as `[cubes, n]` partial sums, which one small
//! reduction finishes (reducing all the rows at once is what burn-cuda does slowly). The
//! first pass over a row keeps `x̂` and the mask in shared memory for the second.
//!
//! Attention's softmax: one cube per row of the scores, each way, in f32.
//!
//! AdamW: one unit per element of the flat buffers.
//!
//! Keyed dropout (see [`crate::dropout`]): four neighbouring elements of a row share one
//! 64-bit draw of the row's stream, so every pass that applies a mask takes a row's
//! columns in groups of four, one draw a group (a SplitMix64 output is some 30 integer
//! operations, several times an element's memory traffic on a GPU). The GPU has no 64-bit
//! integers everywhere (WebGPU has none), so the draws are computed on pairs of 32-bit
//! words.

use burn::tensor::{DType, Shape, Tensor as BurnTensor, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::adamw::{AdamwOps, AdamwStep, adamw_with_burn_ops};
use super::float;
use super::layer_norm::LayerNormOps;
use super::softmax::SoftmaxOps;
use crate::dropout::{self, DropoutOps, GAMMA, KEY_MULTIPLIER, KeyedMask, RowKeys};

#[cfg(feature = "wgpu")]
mod cuda_source;
#[cfg(feature = "wgpu")]
pub use cuda_source::{CudaSource, cuda_sources};

/// The longest row the LayerNorm kernels take (longer ones keep burn's LayerNorm): the
/// backward keeps two rows of f32 in shared memory, which must stay under the 48 KB a cube
/// may use without opting in.
const MAX_ROW_LEN: usize = 4096;

fn assert_row_fits(n: usize) {
    assert!(n <= MAX_ROW_LEN, "LayerNorm rows of {n} > {MAX_ROW_LEN}");
}

/// Rows of one backward cube: enough that γ's and β's partial sums are few, few enough
/// that the cubes fill the GPU (16k rows make 512 cubes).
const ROWS_PER_CUBE: usize = 32;

/// Units per cube for rows of `n`: `n` rounded up to a power of two, from 32 to 256.
fn units(n: usize) -> u32 {
    (n.next_power_of_two().clamp(32, 256)) as u32
}

/// `value` summed over the cube's units (all of them must call it), through `shared`, one
/// value per unit; the cube's width is a power of two.
#[cube]
fn cube_sum(shared: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    // A runtime value (the cube's width is `units`): a comptime one cannot be halved.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            shared[unit] = shared[unit] + shared[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// The cube's row (cubes are laid out 2-D when there are more rows than one grid
/// dimension holds).
#[cube]
fn cube_index() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// The dropout stream of row `row`, whose grid position is `positions[row]` when `listed`
/// and `row` otherwise; unused without dropout.
#[cube]
fn listed_row_stream<I: Int>(
    positions: &Tensor<I>,
    row: usize,
    mask: DropoutArgs,
    #[comptime] listed: bool,
) -> Word {
    let mut f = row as u32;
    if listed {
        f = u32::cast_from(positions[row]);
    }
    row_stream(f, mask)
}

/// With `dropout`, normalises `x ⊙ M + residual` (the mask of [`crate::dropout`]).
#[cube(launch)]
fn layer_norm_forward_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    residual: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    output: &mut Tensor<F>,
    stats: &mut Tensor<f32>,
    positions: &Tensor<I>,
    epsilon: f32,
    mask: DropoutArgs,
    #[comptime] units: u32,
    #[comptime] row_len: u32,
    #[comptime] dropout: bool,
    #[comptime] listed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = cube_index();
    let rows = stats.shape(0);
    if row >= rows {
        terminate!();
    }
    let n = row_len as usize;
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let base = row * n;
    let mut shared = SharedMemory::<f32>::new(units as usize);
    let stream = listed_row_stream(positions, row, mask, listed);

    // The row's `x ⊙ M + residual`, computed once into shared memory; the reduction's
    // barrier makes it whole before the other passes read it.
    let mut sums = SharedMemory::<f32>::new(row_len as usize);
    let mut sum = f32::new(0.0);
    let mut group = first;
    while group < n.div_ceil(4) {
        let bits = group_bits(stream, group, dropout);
        let mut lane = 0usize;
        while lane < 4 {
            let i = group * 4 + lane;
            if i < n {
                let mut value = f32::cast_from(x[base + i]);
                if dropout {
                    value *= lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
                }
                value += f32::cast_from(residual[base + i]);
                sums[i] = value;
                sum += value;
            }
            lane += 1;
        }
        group += step;
    }
    let mean = cube_sum(&mut shared, sum) / f32::cast_from(n);

    let mut squares = f32::new(0.0);
    let mut i = first;
    while i < n {
        let centred = sums[i] - mean;
        squares += centred * centred;
        i += step;
    }
    let variance = cube_sum(&mut shared, squares) / f32::cast_from(n);
    let inverse_std = f32::new(1.0) / f32::sqrt(variance + epsilon);

    let mut i = first;
    while i < n {
        let normalised = (sums[i] - mean) * inverse_std;
        output[base + i] =
            F::cast_from(normalised * f32::cast_from(gamma[i]) + f32::cast_from(beta[i]));
        i += step;
    }
    if first == 0 {
        stats[row * 2] = mean;
        stats[row * 2 + 1] = inverse_std;
    }
}

/// Writes `ds = d(x ⊙ M + residual)` and, with `dropout`, `dx = ds ⊙ M`.
#[cube(launch)]
fn layer_norm_backward_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    residual: &Tensor<F>,
    gamma: &Tensor<F>,
    stats: &Tensor<f32>,
    dy: &Tensor<F>,
    ds: &mut Tensor<F>,
    dx: &mut Tensor<F>,
    gamma_partials: &mut Tensor<f32>,
    beta_partials: &mut Tensor<f32>,
    positions: &Tensor<I>,
    mask: DropoutArgs,
    #[comptime] units: u32,
    #[comptime] row_len: u32,
    #[comptime] rows_per_cube: u32,
    #[comptime] dropout: bool,
    #[comptime] listed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let cube = cube_index();
    let rows = stats.shape(0);
    let first_row = cube * rows_per_cube as usize;
    if first_row >= rows {
        terminate!();
    }
    let n = row_len as usize;
    let groups = n.div_ceil(4);
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let partials = cube * n;
    let mut shared = SharedMemory::<f32>::new(units as usize);
    // A row's x̂ and mask factors, from the first pass for the second.
    let mut normalised_row = SharedMemory::<f32>::new(row_len as usize);
    let mut factors = SharedMemory::<f32>::new(row_len as usize);

    // Each unit owns the groups of four columns first, first + step, ... (one dropout draw
    // each): no other unit touches their partial sums.
    let mut group = first;
    while group < groups {
        let mut i = group * 4;
        while i < n && i < group * 4 + 4 {
            gamma_partials[partials + i] = f32::new(0.0);
            beta_partials[partials + i] = f32::new(0.0);
            i += 1;
        }
        group += step;
    }

    let mut row = first_row;
    let mut last_row = first_row + rows_per_cube as usize;
    if last_row > rows {
        last_row = rows;
    }
    while row < last_row {
        let base = row * n;
        let mean = stats[row * 2];
        let inverse_std = stats[row * 2 + 1];
        let stream = listed_row_stream(positions, row, mask, listed);

        let mut sum_g = f32::new(0.0);
        let mut sum_g_normalised = f32::new(0.0);
        let mut group = first;
        while group < groups {
            let bits = group_bits(stream, group, dropout);
            let mut lane = 0usize;
            while lane < 4 {
                let i = group * 4 + lane;
                if i < n {
                    let mut value = f32::cast_from(x[base + i]);
                    if dropout {
                        let factor = lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
                        factors[i] = factor;
                        value *= factor;
                    }
                    let normalised =
                        (value + f32::cast_from(residual[base + i]) - mean) * inverse_std;
                    normalised_row[i] = normalised;
                    let upstream = f32::cast_from(dy[base + i]);
                    let g = upstream * f32::cast_from(gamma[i]);
                    sum_g += g;
                    sum_g_normalised += g * normalised;
                    gamma_partials[partials + i] =
                        gamma_partials[partials + i] + upstream * normalised;
                    beta_partials[partials + i] = beta_partials[partials + i] + upstream;
                }
                lane += 1;
            }
            group += step;
        }
        let count = f32::cast_from(n);
        let mean_g = cube_sum(&mut shared, sum_g) / count;
        let mean_g_normalised = cube_sum(&mut shared, sum_g_normalised) / count;

        let mut i = first;
        while i < n {
            let normalised = normalised_row[i];
            let g = f32::cast_from(dy[base + i]) * f32::cast_from(gamma[i]);
            let d = (g - mean_g - normalised * mean_g_normalised) * inverse_std;
            ds[base + i] = F::cast_from(d);
            if dropout {
                dx[base + i] = F::cast_from(d * factors[i]);
            }
            i += step;
        }
        // The next row's first pass overwrites what this pass reads.
        sync_cube();
        row += 1;
    }
}

/// `t` contiguous and of the float type `dtype`, which the kernels read every tensor as
/// (the model's tensors all have one type already: this only guards the op's contract).
fn same_type<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    let t = if t.dtype == dtype {
        t
    } else {
        burn_cubecl::kernel::cast(t, dtype)
    };
    into_contiguous(t)
}

/// Cubes for `count` independent blocks, 2-D beyond one grid dimension's 65,535.
fn cube_count(count: usize) -> CubeCount {
    let count = count as u32;
    let x = count.clamp(1, u16::MAX as u32);
    CubeCount::Static(x, count.div_ceil(x), 1)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LayerNormOps
    for CubeBackend<R, F, I, BT>
{
    fn fused_layer_norm(row_len: usize) -> bool {
        super::enabled() && row_len <= MAX_ROW_LEN
    }

    fn layer_norm_forward(
        x: CubeTensor<R>,
        residual: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        epsilon: f64,
        mask: Option<&KeyedMask<Self>>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let dtype = x.dtype;
        let [x, residual, gamma, beta] = [x, residual, gamma, beta].map(|t| same_type(t, dtype));
        let [rows, n] = x.meta.shape().dims::<2>();
        assert_row_fits(n);
        let (client, device) = (x.client.clone(), x.device.clone());
        let output = empty_device_dtype(
            client.clone(),
            device.clone(),
            x.meta.shape().clone(),
            dtype,
        );
        let stats = empty_device_dtype(
            client.clone(),
            device.clone(),
            Shape::new([rows, 2]),
            DType::F32,
        );
        let (positions, listed) = row_positions::<R, F, I, BT>(mask.map(|m| &m.keys), &x);
        let int_dtype = positions.dtype;
        let units = units(n);
        layer_norm_forward_kernel::launch::<R>(
            &client,
            cube_count(rows),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            residual.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            positions.into_tensor_arg(),
            epsilon as f32,
            dropout_args(mask),
            units,
            n as u32,
            mask.is_some(),
            listed,
            [dtype.into(), int_dtype.into()],
        );
        (output, stats)
    }

    fn layer_norm_backward(
        x: CubeTensor<R>,
        residual: CubeTensor<R>,
        gamma: CubeTensor<R>,
        stats: CubeTensor<R>,
        dy: CubeTensor<R>,
        mask: Option<&KeyedMask<Self>>,
    ) -> [CubeTensor<R>; 4] {
        let dtype = x.dtype;
        let gamma_dtype = gamma.dtype;
        let [x, residual, gamma, dy] = [x, residual, gamma, dy].map(|t| same_type(t, dtype));
        let stats = into_contiguous(stats);
        let [rows, n] = x.meta.shape().dims::<2>();
        assert_row_fits(n);
        let (client, device) = (x.client.clone(), x.device.clone());
        let cubes = rows.div_ceil(ROWS_PER_CUBE);
        let empty = |shape| empty_device_dtype(client.clone(), device.clone(), shape, dtype);
        let ds = empty(x.meta.shape().clone());
        // Written with dropout only: one element will do without.
        let dx = empty(match mask {
            Some(_) => x.meta.shape().clone(),
            None => Shape::new([1]),
        });
        let (positions, listed) = row_positions::<R, F, I, BT>(mask.map(|m| &m.keys), &x);
        let int_dtype = positions.dtype;
        let partial = || {
            empty_device_dtype(
                client.clone(),
                device.clone(),
                Shape::new([cubes, n]),
                DType::F32,
            )
        };
        let (gamma_partials, beta_partials) = (partial(), partial());
        let units = units(n);
        layer_norm_backward_kernel::launch::<R>(
            &client,
            cube_count(cubes),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            residual.into_tensor_arg(),
            gamma.into_tensor_arg(),
            stats.into_tensor_arg(),
            dy.into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            gamma_partials.clone().into_tensor_arg(),
            beta_partials.clone().into_tensor_arg(),
            positions.into_tensor_arg(),
            dropout_args(mask),
            units,
            n as u32,
            ROWS_PER_CUBE as u32,
            mask.is_some(),
            listed,
            [dtype.into(), int_dtype.into()],
        );
        let finish = |partials: CubeTensor<R>| {
            let sums = float::<Self, 2>(partials).sum_dim(0).reshape([n]);
            sums.cast(gamma_dtype).into_primitive().tensor()
        };
        let dx = if mask.is_some() { dx } else { ds.clone() };
        [dx, ds, finish(gamma_partials), finish(beta_partials)]
    }
}

/// One AdamW step per element (see [`super::adamw`]); all buffers flat f32.
#[cube(launch)]
fn adamw_kernel(
    params: &Tensor<f32>,
    exp_avg: &Tensor<f32>,
    exp_avg_sq: &Tensor<f32>,
    grads: &Tensor<f32>,
    decays: &Tensor<f32>,
    new_params: &mut Tensor<f32>,
    new_exp_avg: &mut Tensor<f32>,
    new_exp_avg_sq: &mut Tensor<f32>,
    coefficients: &Tensor<f32>,
) {
    let i = ABSOLUTE_POS;
    if i >= params.len() {
        terminate!();
    }
    let lr = coefficients[0];
    let beta1 = coefficients[1];
    let beta2 = coefficients[2];
    let epsilon = coefficients[3];
    let weight_decay = coefficients[4];
    let bias1 = coefficients[5];
    let bias2 = coefficients[6];
    let one_minus_beta1 = coefficients[7];
    let one_minus_beta2 = coefficients[8];
    let g = grads[i];
    let m = exp_avg[i] * beta1 + g * one_minus_beta1;
    let v = exp_avg_sq[i] * beta2 + g * g * one_minus_beta2;
    let decay = decays[i] * weight_decay * params[i];
    let direction = (m / bias1) / (f32::sqrt(v / bias2) + epsilon) + decay;
    new_params[i] = params[i] - direction * lr;
    new_exp_avg[i] = m;
    new_exp_avg_sq[i] = v;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AdamwOps
    for CubeBackend<R, F, I, BT>
{
    fn adamw(
        params: BurnTensor<Self, 1>,
        exp_avg: BurnTensor<Self, 1>,
        exp_avg_sq: BurnTensor<Self, 1>,
        grads: BurnTensor<Self, 1>,
        decays: BurnTensor<Self, 1>,
        step: &AdamwStep,
    ) -> [BurnTensor<Self, 1>; 3] {
        if !super::enabled() {
            return adamw_with_burn_ops(params, exp_avg, exp_avg_sq, grads, decays, step);
        }
        let device = params.device();
        // The coefficients change every step: a small tensor, not kernel constants (which
        // would compile a kernel per step).
        let coefficients = BurnTensor::<Self, 1>::from_data(
            TensorData::new(
                vec![
                    step.lr,
                    step.beta1,
                    step.beta2,
                    step.epsilon,
                    step.weight_decay,
                    step.bias1,
                    step.bias2,
                    1.0 - step.beta1,
                    1.0 - step.beta2,
                ],
                [9],
            ),
            (&device, DType::F32),
        );
        let [params, exp_avg, exp_avg_sq, grads, decays, coefficients] =
            [params, exp_avg, exp_avg_sq, grads, decays, coefficients]
                .map(|t| same_type(t.into_primitive().tensor(), DType::F32));
        let n = params.meta.num_elements();
        let client = params.client.clone();
        let empty = || {
            empty_device_dtype(
                client.clone(),
                params.device.clone(),
                params.meta.shape().clone(),
                DType::F32,
            )
        };
        let outputs = [empty(), empty(), empty()];
        let cube_dim = CubeDim::new_1d(256);
        adamw_kernel::launch::<R>(
            &client,
            calculate_cube_count_elemwise(&client, n, cube_dim),
            cube_dim,
            params.into_tensor_arg(),
            exp_avg.into_tensor_arg(),
            exp_avg_sq.into_tensor_arg(),
            grads.into_tensor_arg(),
            decays.into_tensor_arg(),
            outputs[0].clone().into_tensor_arg(),
            outputs[1].clone().into_tensor_arg(),
            outputs[2].clone().into_tensor_arg(),
            coefficients.into_tensor_arg(),
        );
        outputs.map(float::<Self, 1>)
    }
}

/// `value`'s maximum over the cube's units, as [`cube_sum`].
#[cube]
fn cube_max(shared: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride && shared[unit + stride] > shared[unit] {
            shared[unit] = shared[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// One cube per row of the scores: its maximum, then its sum of exponentials, then the
/// probabilities (see [`super::softmax`]). `per_batch` is heads × seq, the rows that share
/// one row of the bias.
/// With `dropout`, also writes `dropped = P ⊙ M` (see [`super::softmax`]).
#[cube(launch)]
fn softmax_kernel<F: Float>(
    scores: &Tensor<F>,
    bias: &Tensor<F>,
    probs: &mut Tensor<F>,
    dropped: &mut Tensor<F>,
    divisor: f32,
    per_batch: usize,
    mask: DropoutArgs,
    #[comptime] units: u32,
    #[comptime] dropout: bool,
    #[define(F)] _dtype: StorageType,
) {
    let n = scores.shape(3);
    let row = cube_index();
    if row * n >= scores.len() {
        terminate!();
    }
    let base = row * n;
    let bias_base = (row / per_batch) * n;
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units as usize);

    let mut largest = f32::new(-1.0e30);
    let mut i = first;
    while i < n {
        let v = f32::cast_from(scores[base + i]) / divisor + f32::cast_from(bias[bias_base + i]);
        if v > largest {
            largest = v;
        }
        i += step;
    }
    let largest = cube_max(&mut shared, largest);

    let mut sum = f32::new(0.0);
    let mut i = first;
    while i < n {
        let v = f32::cast_from(scores[base + i]) / divisor + f32::cast_from(bias[bias_base + i]);
        sum += f32::exp(v - largest);
        i += step;
    }
    let sum = cube_sum(&mut shared, sum);

    // In groups of four columns, which share one draw of the row's stream.
    let stream = row_stream(row as u32, mask);
    let mut group = first;
    while group < n.div_ceil(4) {
        let bits = group_bits(stream, group, dropout);
        let mut lane = 0usize;
        while lane < 4 {
            let i = group * 4 + lane;
            if i < n {
                let v = f32::cast_from(scores[base + i]) / divisor
                    + f32::cast_from(bias[bias_base + i]);
                let p = f32::exp(v - largest) / sum;
                probs[base + i] = F::cast_from(p);
                if dropout {
                    let factor = lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
                    dropped[base + i] = F::cast_from(p * factor);
                }
            }
            lane += 1;
        }
        group += step;
    }
}

/// One cube per row: `d(scores) = P ⊙ (dP − Σ dP ⊙ P) / divisor`; with `dropout`,
/// `dprobs` is the gradient of `P ⊙ M`, and `dP` is it times the mask, drawn again.
#[cube(launch)]
fn softmax_backward_kernel<F: Float>(
    probs: &Tensor<F>,
    dprobs: &Tensor<F>,
    dscores: &mut Tensor<F>,
    divisor: f32,
    mask: DropoutArgs,
    #[comptime] units: u32,
    #[comptime] dropout: bool,
    #[define(F)] _dtype: StorageType,
) {
    let n = probs.shape(3);
    let row = cube_index();
    if row * n >= probs.len() {
        terminate!();
    }
    let base = row * n;
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units as usize);

    // Both passes in groups of four columns, which share one draw of the row's stream.
    let stream = row_stream(row as u32, mask);
    let groups = n.div_ceil(4);
    let mut dot = f32::new(0.0);
    let mut group = first;
    while group < groups {
        let bits = group_bits(stream, group, dropout);
        let mut lane = 0usize;
        while lane < 4 {
            let i = group * 4 + lane;
            if i < n {
                let mut g = f32::cast_from(dprobs[base + i]);
                if dropout {
                    g *= lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
                }
                dot += g * f32::cast_from(probs[base + i]);
            }
            lane += 1;
        }
        group += step;
    }
    let dot = cube_sum(&mut shared, dot);

    let mut group = first;
    while group < groups {
        let bits = group_bits(stream, group, dropout);
        let mut lane = 0usize;
        while lane < 4 {
            let i = group * 4 + lane;
            if i < n {
                let p = f32::cast_from(probs[base + i]);
                let mut g = f32::cast_from(dprobs[base + i]);
                if dropout {
                    g *= lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
                }
                dscores[base + i] = F::cast_from(p * (g - dot) / divisor);
            }
            lane += 1;
        }
        group += step;
    }
}

/// Dropout inside a kernel, if any.
type KernelMask<'a, R, F, I, BT> = Option<&'a KeyedMask<CubeBackend<R, F, I, BT>>>;

/// Launches the softmax kernel; with dropout, also writes `P ⊙ M`.
/// Returns `(P, P ⊙ M)`.
fn softmax_forward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    scores: CubeTensor<R>,
    bias: CubeTensor<R>,
    divisor: f32,
    dropout: KernelMask<R, F, I, BT>,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    assert_grid_rows(dropout);
    let dtype = scores.dtype;
    let [scores, bias] = [scores, bias].map(|t| same_type(t, dtype));
    let shape = scores.meta.shape().clone();
    let [batch, heads, seq, n] = shape.dims::<4>();
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let empty = |shape| empty_device_dtype(client.clone(), device.clone(), shape, dtype);
    let probs = empty(shape.clone());
    // Not written without dropout: one element will do.
    let dropped = empty(if dropout.is_some() {
        shape
    } else {
        Shape::new([1])
    });
    let units = units(n);
    softmax_kernel::launch::<R>(
        &client,
        cube_count(batch * heads * seq),
        CubeDim::new_1d(units),
        scores.into_tensor_arg(),
        bias.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        dropped.clone().into_tensor_arg(),
        divisor,
        heads * seq,
        dropout_args(dropout),
        units,
        dropout.is_some(),
        dtype.into(),
    );
    (probs, dropout.map(|_| dropped))
}

/// Launches the softmax backward kernel; with dropout, `dprobs` is the gradient of `P ⊙ M`.
fn softmax_backward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    probs: CubeTensor<R>,
    dprobs: CubeTensor<R>,
    divisor: f32,
    dropout: KernelMask<R, F, I, BT>,
) -> CubeTensor<R> {
    assert_grid_rows(dropout);
    let dtype = probs.dtype;
    let [probs, dprobs] = [probs, dprobs].map(|t| same_type(t, dtype));
    let [batch, heads, seq, n] = probs.meta.shape().dims::<4>();
    let (client, device) = (probs.client.clone(), probs.device.clone());
    let dscores = empty_device_dtype(client.clone(), device, probs.meta.shape().clone(), dtype);
    let units = units(n);
    softmax_backward_kernel::launch::<R>(
        &client,
        cube_count(batch * heads * seq),
        CubeDim::new_1d(units),
        probs.into_tensor_arg(),
        dprobs.into_tensor_arg(),
        dscores.clone().into_tensor_arg(),
        divisor,
        dropout_args(dropout),
        units,
        dropout.is_some(),
        dtype.into(),
    );
    dscores
}

/// The grid positions of listed rows, and whether the rows are listed (an unread one-element
/// tensor on `like`'s device when they are not, or when there are no keys).
fn row_positions<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    keys: Option<&RowKeys<CubeBackend<R, F, I, BT>>>,
    like: &CubeTensor<R>,
) -> (CubeTensor<R>, bool) {
    match keys.and_then(|k| k.parts().3) {
        Some(positions) => (into_contiguous(positions.clone()), true),
        None => {
            let (client, device) = (like.client.clone(), like.device.clone());
            let unread = empty_device_dtype(client, device, Shape::new([1]), I::dtype());
            (unread, false)
        }
    }
}

/// The softmax kernels key a row by its index: attention's rows are in grid order.
fn assert_grid_rows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dropout: KernelMask<R, F, I, BT>,
) {
    let listed = dropout.is_some_and(|m| m.keys.parts().3.is_some());
    assert!(!listed, "attention's dropout rows are in grid order");
}

/// The kernels' dropout scalars (zeros, unread, without dropout). The rows of attention's
/// probabilities are always in grid order.
fn dropout_args<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dropout: KernelMask<R, F, I, BT>,
) -> DropoutArgsLaunch<R> {
    match dropout {
        Some(mask) => mask_args(&mask.keys, mask.call, mask.prob),
        None => DropoutArgsLaunch::new(0, 1, 0, 0, 0, 0, 0.0),
    }
}

/// The dropout scalars of the rows `keys` names, for the stream value `call`.
fn mask_args<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    keys: &RowKeys<CubeBackend<R, F, I, BT>>,
    call: u64,
    prob: f64,
) -> DropoutArgsLaunch<R> {
    let (first, seq, offset, _) = keys.parts();
    DropoutArgsLaunch::new(
        first as u32,
        seq,
        offset,
        (call >> 32) as u32,
        call as u32,
        dropout::drop_below(prob),
        dropout::keep_scale(prob),
    )
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SoftmaxOps
    for CubeBackend<R, F, I, BT>
{
    fn fused_softmax() -> bool {
        super::enabled()
    }

    fn attention_softmax(
        scores: CubeTensor<R>,
        bias: CubeTensor<R>,
        divisor: f32,
    ) -> CubeTensor<R> {
        softmax_forward::<R, F, I, BT>(scores, bias, divisor, None).0
    }

    fn attention_softmax_backward(
        probs: CubeTensor<R>,
        dprobs: CubeTensor<R>,
        divisor: f32,
    ) -> CubeTensor<R> {
        softmax_backward::<R, F, I, BT>(probs, dprobs, divisor, None)
    }

    fn attention_softmax_dropout(
        scores: CubeTensor<R>,
        bias: CubeTensor<R>,
        divisor: f32,
        mask: &KeyedMask<Self>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (probs, dropped) = softmax_forward(scores, bias, divisor, Some(mask));
        (dropped.expect("written with dropout"), probs)
    }

    fn attention_softmax_dropout_backward(
        probs: CubeTensor<R>,
        ddropped: CubeTensor<R>,
        divisor: f32,
        mask: &KeyedMask<Self>,
    ) -> CubeTensor<R> {
        softmax_backward(probs, ddropped, divisor, Some(mask))
    }
}

/// A 64-bit integer as two 32-bit words.
#[derive(CubeType, Clone, Copy)]
struct Word {
    hi: u32,
    lo: u32,
}

#[cube]
fn word(#[comptime] value: u64) -> Word {
    Word {
        hi: comptime!((value >> 32) as u32),
        lo: comptime!(value as u32),
    }
}

#[cube]
fn word_add(a: Word, b: Word) -> Word {
    let lo = a.lo + b.lo;
    let carry = select(lo < a.lo, 1u32, 0u32);
    Word {
        hi: a.hi + b.hi + carry,
        lo,
    }
}

/// The low 64 bits of the product.
#[cube]
fn word_mul(a: Word, b: Word) -> Word {
    Word {
        hi: u32::mul_hi(a.lo, b.lo) + a.lo * b.hi + a.hi * b.lo,
        lo: a.lo * b.lo,
    }
}

#[cube]
fn word_xor(a: Word, b: Word) -> Word {
    Word {
        hi: a.hi ^ b.hi,
        lo: a.lo ^ b.lo,
    }
}

/// `a ^ (a >> shift)` for `0 < shift < 32`.
#[cube]
fn word_xor_shift(a: Word, #[comptime] shift: u32) -> Word {
    Word {
        hi: a.hi ^ (a.hi >> shift),
        lo: a.lo ^ ((a.lo >> shift) | (a.hi << comptime!(32 - shift))),
    }
}

/// SplitMix64's output function.
#[cube]
fn mix(z: Word) -> Word {
    let z = word_mul(word_xor_shift(z, 30u32), word(0xBF58_476D_1CE4_E5B9u64));
    let z = word_mul(word_xor_shift(z, 27u32), word(0x94D0_49BB_1331_11EBu64));
    word_xor_shift(z, 31u32)
}

/// `x ⊙ mask` (see [`crate::dropout`]): one unit per four elements of a row. Row `r` is
/// grid position `f = r` (or `positions[r]` when `listed`), keyed
/// `(first + f / seq) << 32 | (f % seq + offset)`; only `first`'s low word matters.
#[cube(launch)]
fn keyed_dropout_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    positions: &Tensor<I>,
    output: &mut Tensor<F>,
    row_len: usize,
    mask: DropoutArgs,
    #[comptime] listed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let groups = row_len.div_ceil(4);
    let unit = ABSOLUTE_POS;
    if unit >= (x.len() / row_len) * groups {
        terminate!();
    }
    let row = unit / groups;
    let group = unit % groups;
    let stream = listed_row_stream(positions, row, mask, listed);
    let bits = stream_draw(stream, group);
    let base = row * row_len;
    let mut lane = 0usize;
    while lane < 4 {
        let column = group * 4 + lane;
        if column < row_len {
            let scale = lane_factor(bits, lane, mask.drop_below, mask.keep_scale);
            output[base + column] = F::cast_from(f32::cast_from(x[base + column]) * scale);
        }
        lane += 1;
    }
}

/// The state of the stream of the row at grid position `f`: one SplitMix64 step from
/// `call ^ key · KEY_MULTIPLIER`.
#[cube]
fn row_stream(f: u32, mask: DropoutArgs) -> Word {
    let key = Word {
        hi: mask.first + f / mask.seq,
        lo: f % mask.seq + mask.offset,
    };
    let call = Word {
        hi: mask.call_hi,
        lo: mask.call_lo,
    };
    let start = word_xor(call, word_mul(key, word(KEY_MULTIPLIER)));
    mix(word_add(start, word(GAMMA)))
}

/// The stream's 64-bit draw `group` (elements `4 · group` to `4 · group + 3`).
#[cube]
fn stream_draw(stream: Word, group: usize) -> Word {
    let counter = Word {
        hi: 0u32,
        lo: group as u32 + 1,
    };
    mix(word_add(stream, word_mul(counter, word(GAMMA))))
}

/// What the element in `lane` (0 to 3) of a draw is multiplied by: 0 or `keep_scale`.
#[cube]
fn lane_factor(bits: Word, lane: usize, drop_below: u32, keep_scale: f32) -> f32 {
    let half = select(lane < 2, bits.lo, bits.hi);
    let draw = (half >> (16 * (lane as u32 % 2))) & 0xFFFF;
    select(draw < drop_below, f32::new(0.0), keep_scale)
}

/// The draw shared by the four columns of `group` of a row (none without `dropout`).
#[cube]
fn group_bits(stream: Word, group: usize, #[comptime] dropout: bool) -> Word {
    if dropout {
        stream_draw(stream, group)
    } else {
        Word { hi: 0u32, lo: 0u32 }
    }
}

/// A keyed mask's scalars, as the kernels read them: the row keys' `first` (its low word),
/// `seq` and `offset`, the call's stream value in two words, the 16-bit drop threshold and
/// the kept elements' factor (see [`keyed_dropout_kernel`]).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct DropoutArgs {
    first: u32,
    seq: u32,
    offset: u32,
    call_hi: u32,
    call_lo: u32,
    drop_below: u32,
    keep_scale: f32,
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DropoutOps
    for CubeBackend<R, F, I, BT>
{
    fn keyed_dropout_kernel() -> bool {
        super::enabled()
    }

    fn keyed_dropout(
        x: CubeTensor<R>,
        keys: &RowKeys<Self>,
        call: u64,
        prob: f64,
    ) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let dtype = x.dtype;
        let shape = x.meta.shape().clone();
        let row_len = shape.as_slice().last().copied().unwrap_or(1).max(1);
        let rows = shape.num_elements() / row_len;
        let (client, device) = (x.client.clone(), x.device.clone());
        let (positions, listed) = row_positions::<R, F, I, BT>(Some(keys), &x);
        let int_dtype = positions.dtype;
        let output = empty_device_dtype(client.clone(), device, shape, dtype);
        let units = rows * row_len.div_ceil(4);
        let cube_dim = CubeDim::new_1d(256);
        keyed_dropout_kernel::launch::<R>(
            &client,
            calculate_cube_count_elemwise(&client, units, cube_dim),
            cube_dim,
            x.into_tensor_arg(),
            positions.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            row_len,
            mask_args(keys, call, prob),
            listed,
            [dtype.into(), int_dtype.into()],
        );
        output
    }
}
