//! The GPU collective: NCCL through cudarc, one communicator per job generation.
//!
//! libnccl is opened at run time, so a binary built with the `cuda` feature starts where
//! NCCL is absent and says what is missing only when a job asks for it. The communicator
//! spans processes and machines: rank 0's unique id reaches every rank through the
//! coordinator ([`share_unique_id`]).
//!
//! The trainer hands over gradients in a host buffer (the flat layout the optimizer and
//! checkpoints use), so each operation stages the buffer through one device allocation:
//! copy in, reduce in place on the GPU, copy out. That is correct, and across machines it
//! already uses NCCL's transports (InfiniBand, NVLink) instead of the TCP ring; the
//! zero-copy path, reducing burn's gradient tensors where they live, is not built yet.

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
