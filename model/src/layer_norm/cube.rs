//! The op's kernels for burn's cubecl backends (burn-cuda, and burn-wgpu in tests): one
//! pass over the rows forward, one backward, both accumulating in f32 whatever the
//! tensors' float type.
//!
//! Forward: one cube per row; the row's sum and then its squared deviations are reduced
//! in shared memory, and the normalised row is written with γ and β applied. The row's
//! mean and 1/σ are kept for the backward (8 bytes a row).
//!
//! Backward: one cube per [`ROWS_PER_CUBE`] rows. Per row, with `x̂` the normalised input
//! and `g = dy ⊙ γ`: `d(x + residual) = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ`. Each unit also
//! sums `dy ⊙ x̂` and `dy` over the cube's rows for its own columns, so γ's and β's
//! gradients leave the kernel as `[cubes, n]` partial sums, which one small reduction
//! finishes (reducing all the rows at once is what burn-cuda does slowly).

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use super::LayerNormOps;

/// Rows of one backward cube: enough that γ's and β's partial sums are few, few enough
/// that the cubes fill the GPU (16k rows make 512 cubes).
const ROWS_PER_CUBE: usize = 32;

/// Units per cube: a power of two, at most 256, and no more than the row has columns.
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

#[cube(launch)]
fn forward_kernel<F: Float>(
    x: &Tensor<F>,
    residual: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    output: &mut Tensor<F>,
    stats: &mut Tensor<f32>,
    epsilon: f32,
    #[comptime] units: u32,
    #[define(F)] _dtype: StorageType,
) {
    let row = cube_index();
    let rows = stats.shape(0);
    if row >= rows {
        terminate!();
    }
    let n = x.shape(1);
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let base = row * n;
    let mut shared = SharedMemory::<f32>::new(units as usize);

    let mut sum = f32::new(0.0);
    let mut i = first;
    while i < n {
        sum += f32::cast_from(x[base + i]) + f32::cast_from(residual[base + i]);
        i += step;
    }
    let mean = cube_sum(&mut shared, sum) / f32::cast_from(n);

    let mut squares = f32::new(0.0);
    let mut i = first;
    while i < n {
        let centred = f32::cast_from(x[base + i]) + f32::cast_from(residual[base + i]) - mean;
        squares += centred * centred;
        i += step;
    }
    let variance = cube_sum(&mut shared, squares) / f32::cast_from(n);
    let inverse_std = f32::new(1.0) / f32::sqrt(variance + epsilon);

    let mut i = first;
    while i < n {
        let normalised =
            (f32::cast_from(x[base + i]) + f32::cast_from(residual[base + i]) - mean) * inverse_std;
        output[base + i] =
            F::cast_from(normalised * f32::cast_from(gamma[i]) + f32::cast_from(beta[i]));
        i += step;
    }
    if first == 0 {
        stats[row * 2] = mean;
        stats[row * 2 + 1] = inverse_std;
    }
}

#[cube(launch)]
fn backward_kernel<F: Float>(
    x: &Tensor<F>,
    residual: &Tensor<F>,
    gamma: &Tensor<F>,
    stats: &Tensor<f32>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    gamma_partials: &mut Tensor<f32>,
    beta_partials: &mut Tensor<f32>,
    #[comptime] units: u32,
    #[comptime] rows_per_cube: u32,
    #[define(F)] _dtype: StorageType,
) {
    let cube = cube_index();
    let rows = stats.shape(0);
    let first_row = cube * rows_per_cube as usize;
    if first_row >= rows {
        terminate!();
    }
    let n = x.shape(1);
    let step = units as usize;
    let first = UNIT_POS_X as usize;
    let partials = cube * n;
    let mut shared = SharedMemory::<f32>::new(units as usize);

    // Each unit owns the columns first, first + step, ...: no other unit touches them.
    let mut i = first;
    while i < n {
        gamma_partials[partials + i] = f32::new(0.0);
        beta_partials[partials + i] = f32::new(0.0);
        i += step;
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

        let mut sum_g = f32::new(0.0);
        let mut sum_g_normalised = f32::new(0.0);
        let mut i = first;
        while i < n {
            let normalised = (f32::cast_from(x[base + i]) + f32::cast_from(residual[base + i])
                - mean)
                * inverse_std;
            let upstream = f32::cast_from(dy[base + i]);
            let g = upstream * f32::cast_from(gamma[i]);
            sum_g += g;
            sum_g_normalised += g * normalised;
            gamma_partials[partials + i] = gamma_partials[partials + i] + upstream * normalised;
            beta_partials[partials + i] = beta_partials[partials + i] + upstream;
            i += step;
        }
        let count = f32::cast_from(n);
        let mean_g = cube_sum(&mut shared, sum_g) / count;
        let mean_g_normalised = cube_sum(&mut shared, sum_g_normalised) / count;

        let mut i = first;
        while i < n {
            let normalised = (f32::cast_from(x[base + i]) + f32::cast_from(residual[base + i])
                - mean)
                * inverse_std;
            let g = f32::cast_from(dy[base + i]) * f32::cast_from(gamma[i]);
            dx[base + i] =
                F::cast_from((g - mean_g - normalised * mean_g_normalised) * inverse_std);
            i += step;
        }
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
    let x = count.min(u16::MAX as u32);
    CubeCount::Static(x, count.div_ceil(x), 1)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LayerNormOps
    for CubeBackend<R, F, I, BT>
{
    fn fused_layer_norm() -> bool {
        super::enabled()
    }

    fn layer_norm_forward(
        x: CubeTensor<R>,
        residual: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        epsilon: f64,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let dtype = x.dtype;
        let [x, residual, gamma, beta] = [x, residual, gamma, beta].map(|t| same_type(t, dtype));
        let [rows, n] = x.meta.shape().dims::<2>();
        let (client, device) = (x.client.clone(), x.device.clone());
        let output = empty_device_dtype(
            client.clone(),
            device.clone(),
            x.meta.shape().clone(),
            dtype,
        );
        let stats = empty_device_dtype(client.clone(), device, Shape::new([rows, 2]), DType::F32);
        let units = units(n);
        forward_kernel::launch::<R>(
            &client,
            cube_count(rows),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            residual.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            epsilon as f32,
            units,
            dtype.into(),
        );
        (output, stats)
    }

    fn layer_norm_backward(
        x: CubeTensor<R>,
        residual: CubeTensor<R>,
        gamma: CubeTensor<R>,
        stats: CubeTensor<R>,
        dy: CubeTensor<R>,
    ) -> [CubeTensor<R>; 3] {
        let dtype = x.dtype;
        let gamma_dtype = gamma.dtype;
        let [x, residual, gamma, dy] = [x, residual, gamma, dy].map(|t| same_type(t, dtype));
        let stats = into_contiguous(stats);
        let [rows, n] = x.meta.shape().dims::<2>();
        let (client, device) = (x.client.clone(), x.device.clone());
        let cubes = rows.div_ceil(ROWS_PER_CUBE);
        let dx = empty_device_dtype(
            client.clone(),
            device.clone(),
            x.meta.shape().clone(),
            dtype,
        );
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
        backward_kernel::launch::<R>(
            &client,
            cube_count(cubes),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            residual.into_tensor_arg(),
            gamma.into_tensor_arg(),
            stats.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            gamma_partials.clone().into_tensor_arg(),
            beta_partials.clone().into_tensor_arg(),
            units,
            ROWS_PER_CUBE as u32,
            dtype.into(),
        );
        let finish = |partials: CubeTensor<R>| {
            let sums = super::float::<Self, 2>(partials).sum_dim(0).reshape([n]);
            sums.cast(gamma_dtype).into_primitive().tensor()
        };
        [dx, finish(gamma_partials), finish(beta_partials)]
    }
}
