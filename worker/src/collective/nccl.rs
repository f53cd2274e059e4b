//! The GPU collective: NCCL through cudarc, one communicator per job generation.
//!
//! libnccl is opened at run time, so a binary built with the `cuda` feature starts where
//! NCCL is absent and says what is missing only when a job asks for it. The communicator
//! spans processes and machines: rank 0's unique id reaches every rank through the
//! coordinator ([`share_unique_id`]).
//!
//! Two ways in:
//! - [`NcclCollective::all_reduce_mean_tensor`]: a burn-cuda f32 tensor reduced in place
//!   in its own device memory, no copy through the host. This is how the device-resident
//!   optimizer (`crate::resident`) averages each step's gradients.
//! - The [`Collective`] methods on host buffers (the starting broadcast, the stop vote, the
//!   host optimizer path) stage through one device allocation: copy in, reduce on the GPU,
//!   copy out.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bertrain_coordinator::WorkerClient;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collective;
use super::bootstrap::{UNIQUE_ID_LEN, share_unique_id};

/// An NCCL communicator of the whole job and the device buffer it stages through.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// Grown to the largest buffer seen; reused by every operation.
    staging: Option<CudaSlice<f32>>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `NcclCollective` is only used through `&mut self`, one call at a time. cudarc
// leaves `Comm` !Send only because it holds a raw pointer.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Builds this rank's communicator on GPU `device`: rank 0 creates the unique id, the
    /// coordinator relays it, and every rank joins with it. NCCL's own initialisation waits
    /// for all `world` ranks.
    pub fn connect(
        client: &WorkerClient,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclCollective> {
        check_library()?;
        let context = CudaContext::new(device)
            .map_err(|e| anyhow!("NCCL: cannot open GPU {device}: {e:?}"))?;
        let stream = context.default_stream();
        let id = share_unique_id(client, rank, create_unique_id, timeout)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| {
            anyhow!("NCCL: rank {rank} of {world} could not join the communicator: {e:?}")
        })?;
        tracing::info!(rank, world, device, "NCCL communicator ready");
        Ok(NcclCollective {
            comm,
            stream,
            staging: None,
        })
    }

    /// Copies `buf` into the staging buffer, runs `op` on it, and copies it back.
    fn staged(
        &mut self,
        buf: &mut [f32],
        op: impl FnOnce(&Comm, &mut CudaSlice<f32>, usize) -> Result<()>,
    ) -> Result<()> {
        let n = buf.len();
        if self.staging.as_ref().is_none_or(|s| s.len() < n) {
            self.staging = Some(
                self.stream
                    .alloc_zeros::<f32>(n)
                    .context("NCCL: allocating the staging buffer")?,
            );
        }
        let staging = self.staging.as_mut().expect("allocated above");
        self.stream
            .memcpy_htod(buf, &mut staging.slice_mut(..n))
            .context("NCCL: copying to the GPU")?;
        op(&self.comm, staging, n)?;
        self.stream
            .memcpy_dtoh(&staging.slice(..n), buf)
            .context("NCCL: copying from the GPU")?;
        self.stream
            .synchronize()
            .context("NCCL: waiting for the GPU")?;
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.staged(buf, |comm, staging, n| {
            comm.all_reduce_in_place(&mut staging.slice_mut(..n), &ReduceOp::Avg)
                .map(drop)
                .map_err(|e| anyhow!("NCCL all-reduce failed: {e:?}"))
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.staged(buf, |comm, staging, n| {
            comm.broadcast_in_place(&mut staging.slice_mut(..n), root as i32)
                .map(drop)
                .map_err(|e| anyhow!("NCCL broadcast from rank {root} failed: {e:?}"))
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_mean(&mut [0.0])
    }

    fn as_nccl(&mut self) -> Option<&mut NcclCollective> {
        Some(self)
    }
}

fn create_unique_id() -> Result<[u8; UNIQUE_ID_LEN]> {
    let id = Id::new().map_err(|e| anyhow!("NCCL: cannot create a unique id: {e:?}"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// Fails with one line when libnccl cannot be opened (cudarc would panic on first use).
fn check_library() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        bail!(
            "cluster.backend = \"cuda\" all-reduces with NCCL, and libnccl.so was not found; install NCCL \
             (e.g. `pip install nvidia-nccl-cu12`) and add the directory holding libnccl.so.2 to LD_LIBRARY_PATH"
        );
    }
    Ok(())
}

/// A 1-D float tensor of `burn::backend::Cuda` without autodiff: what the resident
/// optimizer's flat gradient tensor is on a GPU.
pub type CudaTensor = burn::tensor::Tensor<burn::backend::Cuda, 1>;

impl NcclCollective {
    /// Replaces the f32 tensor `t` with its mean over the ranks, in place in device memory:
    /// no copy through the host. The kernels that computed `t` are waited for first, and
    /// NCCL's stream is waited for before anything reads it again. burn-cuda (cubecl) and
    /// cudarc both work in the device's primary context, so burn's pointer is valid here.
    pub fn all_reduce_mean_tensor(&mut self, t: &CudaTensor) -> Result<()> {
        use burn::tensor::backend::Backend;
        if t.dtype() != burn::tensor::DType::F32 {
            bail!(
                "NCCL all-reduce of a {:?} tensor; the gradients are f32",
                t.dtype()
            );
        }
        let len = t.dims()[0];
        // burn's CUDA backend is built without its fusion layer here, so the primitive is
        // cubecl's tensor: a compute client and a handle to the buffer. A clone shares the
        // buffer with `t`.
        let cube = t.clone().into_primitive().tensor();
        <burn::backend::Cuda as Backend>::sync(&t.device())
            .map_err(|e| anyhow!("waiting for the gradients on the GPU: {e:?}"))?;
        let resource = cube
            .client
            .get_resource(cube.handle.clone())
            .map_err(|e| anyhow!("reaching the gradients' device memory: {e:?}"))?;
        if resource.resource().size < (len * size_of::<f32>()) as u64 {
            bail!(
                "the gradients' device buffer holds {} bytes, fewer than {len} f32 values",
                resource.resource().size
            );
        }
        let mut buffer = BorrowedBuffer {
            ptr: resource.resource().ptr,
            len,
            stream: self.stream.clone(),
        };
        self.comm
            .all_reduce_in_place(&mut buffer, &ReduceOp::Avg)
            .map_err(|e| anyhow!("NCCL all-reduce failed: {e:?}"))?;
        self.stream
            .synchronize()
            .context("NCCL: waiting for the all-reduce")?;
        drop(resource);
        Ok(())
    }
}

/// `len` f32 values of device memory that burn owns, lent to NCCL for one call. Ordering
/// is done by the caller (burn's work is waited for before, NCCL's after).
struct BorrowedBuffer {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl cudarc::driver::DeviceSlice<f32> for BorrowedBuffer {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl cudarc::driver::DevicePtrMut<f32> for BorrowedBuffer {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}
