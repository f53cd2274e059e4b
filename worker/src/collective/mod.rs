//! Collectives between the workers of a job, behind one small trait so that the CPU ring
//! and NCCL are interchangeable.
//!
//! - [`LocalCollective`]: a job of one worker.
//! - [`TcpRing`]: the CPU implementation, a bandwidth-optimal ring over TCP. Each rank
//!   binds a [`RingListener`] before joining, reports its address to the coordinator, and
//!   connects the ring once the coordinator has told every rank its peers.
//! - NCCL (`cuda` feature, [`connect_nccl`]): the GPU implementation; its communicator is
//!   built from a unique id that rank 0 shares through the coordinator ([`share_unique_id`]).

mod bootstrap;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
pub use nccl::{CudaTensor, NcclCollective};
mod ring;
pub mod wire;

pub use bootstrap::{UNIQUE_ID_LEN, share_unique_id};
pub use ring::{RingListener, RingOptions, TcpRing, tune};

use std::time::Duration;

use anyhow::Result;
use bertrain_coordinator::WorkerClient;

/// This rank's NCCL communicator on GPU `device`, built with the rest of the job's ranks.
pub fn connect_nccl(
    client: &WorkerClient,
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    #[cfg(feature = "cuda")]
    {
        let nccl = nccl::NcclCollective::connect(client, rank, world, device, timeout)?;
        Ok(Box::new(nccl))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (client, rank, world, device, timeout);
        anyhow::bail!(
            "NCCL: this bertrain was built without GPU support; rebuild with `cargo build --release --features cuda`"
        )
    }
}

/// Operations every rank calls in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise mean over ranks. Every rank ends
    /// with bitwise-identical contents, and the result is deterministic at a fixed world size.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Replaces `buf` on every rank with `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// This collective as NCCL, which can reduce GPU tensors in place (see
    /// `resident::DeviceMaster::all_reduce`); `None` for the others.
    #[cfg(feature = "cuda")]
    fn as_nccl(&mut self) -> Option<&mut NcclCollective> {
        None
    }
    /// A handle that ends this collective's operations from another thread; `None` where
    /// that is not possible (one rank, NCCL).
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
}

/// Ends a collective's operations in progress and to come, from another thread: they fail
/// at once instead of waiting for a peer that is gone (the coordinator said so).
pub struct AbortHandle {
    streams: Vec<std::net::TcpStream>,
}

impl AbortHandle {
    pub(crate) fn new(streams: Vec<std::net::TcpStream>) -> AbortHandle {
        AbortHandle { streams }
    }

    pub fn abort(&self) {
        for stream in &self.streams {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The collective of a job with one worker: every operation is the identity.
pub struct LocalCollective;

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<()> {
        anyhow::ensure!(
            root == 0,
            "broadcast from rank {root} in a job of one worker"
        );
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
