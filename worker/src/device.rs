//! Which backend a worker trains on, and the check that it is usable.
//!
//! The CPU backend is always built. The CUDA backend exists only with the `cuda` cargo
//! feature; its libraries are loaded at run time, so [`check`] can say in one line what is
//! missing (the feature, the driver, the GPU) before a worker joins a job it cannot serve.

use anyhow::{Result, anyhow};
use bertrain_coordinator::job::{Backend, JobConfig, Precision};
use bertrain_model::TrainingBackend;
use burn::tensor::backend::{Backend as BurnBackend, DeviceError};
use burn::tensor::{FloatDType, IntDType};

use crate::CpuBackend;
use crate::throughput::Peak;

/// Work written once for every training backend: a worker's generation, a benchmark, a
/// fine-tuning run. [`with_backend`] picks the concrete backend at run time, so no caller
/// keeps its own `cfg(feature = "cuda")` dispatch.
pub trait OnBackend {
    type Output;
    /// Runs on `device` of backend `B`, whose precision is already set.
    fn run<B: TrainingBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// A backend and, for CUDA, the GPU index.
#[derive(Debug, Clone, Copy)]
pub struct DeviceChoice {
    pub backend: Backend,
    pub index: usize,
    pub precision: Precision,
}

impl DeviceChoice {
    /// The job's backend and precision on GPU `index` (ignored on the CPU).
    pub fn from_job(job: &JobConfig, index: usize) -> DeviceChoice {
        DeviceChoice {
            backend: job.cluster.backend,
            index,
            precision: job.train.precision,
        }
    }
}

/// Makes `device` compute in `precision`: with bf16 every float tensor created on it from
/// now on (the model's parameters, activations, gradients) is bf16, while the trainer's
/// master parameters and optimizer state stay f32. burn fixes a device's types
/// at its first tensor, so this must come before the model is built. A later generation in
/// the same process finds the device already set, which is fine if it is set the same way.
pub fn set_precision<B: BurnBackend>(device: &B::Device, precision: Precision) -> Result<()> {
    let float = match precision {
        Precision::Fp32 => FloatDType::F32,
        Precision::Bf16 => FloatDType::BF16,
    };
    match burn::tensor::set_default_dtypes::<B>(device, float, IntDType::I32) {
        Ok(()) => Ok(()),
        Err(DeviceError::AlreadyInitialized { .. })
            if burn::tensor::get_device_settings::<B>(device).float_dtype == float =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "train.precision = {precision:?}: the device cannot compute in {float:?}: {e:?}"
        )),
    }
}

/// Fails with one line when `backend` cannot run here.
pub fn check(backend: Backend, index: usize) -> Result<()> {
    match backend {
        Backend::Cpu => Ok(()),
        Backend::Cuda => cuda::check(index),
    }
}

/// The peak that this worker's MFU is relative to: `cluster.device_peak_tflops` when the
/// job sets it, else the known peak of the GPU, else none.
pub fn peak(choice: DeviceChoice, configured_tflops: Option<f64>) -> Option<Peak> {
    match (configured_tflops, choice.backend) {
        (Some(tflops), _) => Some(Peak {
            tflops,
            source: "cluster.device_peak_tflops".into(),
        }),
        (None, Backend::Cpu) => None,
        (None, Backend::Cuda) => cuda::name(choice.index).and_then(|name| Peak::of_gpu(&name)),
    }
}

/// Runs `work` on the chosen backend, after checking that it is usable and setting the
/// device's precision.
pub fn with_backend<W: OnBackend>(choice: DeviceChoice, work: W) -> Result<W::Output> {
    match choice.backend {
        Backend::Cpu => {
            let device = Default::default();
            set_precision::<CpuBackend>(&device, choice.precision)?;
            work.run::<CpuBackend>(device)
        }
        Backend::Cuda => {
            cuda::check(choice.index)?;
            cuda::run(work, choice.index, choice.precision)
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::{Result, bail};
    use bertrain_coordinator::job::Precision;
    use cudarc::driver::result as driver;

    use super::OnBackend;

    type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

    pub fn check(index: usize) -> Result<()> {
        // SAFETY: only probes whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                "--backend cuda: the NVIDIA driver library (libcuda.so) was not found; install the driver, \
                 or add its directory to LD_LIBRARY_PATH"
            );
        }
        driver::init().map_err(|e| {
            anyhow::anyhow!("--backend cuda: the CUDA driver failed to start: {e:?}")
        })?;
        let count = driver::device::get_count()
            .map_err(|e| anyhow::anyhow!("--backend cuda: cannot count GPUs: {e:?}"))?;
        if count <= 0 {
            bail!("--backend cuda: the CUDA driver sees no GPU on this machine");
        }
        if index >= count as usize {
            bail!(
                "--backend cuda: GPU {index} requested (--device / LOCAL_RANK) but this machine has {count}"
            );
        }
        bertrain_model::dense::check_cublaslt().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The name the driver gives GPU `index`.
    pub fn name(index: usize) -> Option<String> {
        // SAFETY: only probes whether the driver library can be opened (cudarc panics on
        // first use where it cannot, and `check` has not necessarily run yet).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return None;
        }
        // The worker may ask before anything else has started the driver.
        driver::init().ok()?;
        let device = driver::device::get(index as i32).ok()?;
        driver::device::get_name(device).ok()
    }

    pub fn run<W: OnBackend>(work: W, index: usize, precision: Precision) -> Result<W::Output> {
        let device = burn::backend::cuda::CudaDevice::new(index);
        super::set_precision::<CudaBackend>(&device, precision)?;
        work.run::<CudaBackend>(device)
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use anyhow::{Result, bail};
    use bertrain_coordinator::job::Precision;

    use super::OnBackend;

    const NOT_BUILT: &str = "--backend cuda: this bertrain was built without GPU support; rebuild with \
                             `cargo build --release --features cuda`";

    pub fn check(_index: usize) -> Result<()> {
        bail!(NOT_BUILT)
    }

    pub fn name(_index: usize) -> Option<String> {
        None
    }

    pub fn run<W: OnBackend>(_work: W, _index: usize, _precision: Precision) -> Result<W::Output> {
        bail!(NOT_BUILT)
    }
}
