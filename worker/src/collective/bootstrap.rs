//! How the ranks of a job agree on an NCCL unique id.
//!
//! NCCL builds a communicator across processes and machines from one 128-byte unique id
//! that rank 0 creates and every rank passes to `ncclCommInitRank` with its own rank. The
//! id travels through the coordinator, which every worker is already connected to: rank 0
//! sends it as `Bootstrap` bytes and the coordinator relays them to every rank (rank 0
//! included). This part needs no GPU, so it is tested on the CPU.

use std::time::Duration;

use anyhow::{Result, bail};
use bertrain_coordinator::WorkerClient;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_LEN: usize = 128;

/// Returns rank 0's unique id on every rank. Rank 0 makes it with `create`; the other
/// ranks never call `create`. Waits at most `timeout` for the id to come back.
pub fn share_unique_id(
    client: &WorkerClient,
    rank: usize,
    create: impl FnOnce() -> Result<[u8; UNIQUE_ID_LEN]>,
    timeout: Duration,
) -> Result<[u8; UNIQUE_ID_LEN]> {
    let published = if rank == 0 {
        Some(create()?.to_vec())
    } else {
        None
    };
    let blob = client.exchange_bootstrap(published.clone(), timeout)?;
    let Ok(id) = <[u8; UNIQUE_ID_LEN]>::try_from(blob.as_slice()) else {
        bail!(
            "the coordinator relayed {} bytes of collective bootstrap data; an NCCL unique id has \
             {UNIQUE_ID_LEN} (are all workers the same bertrain version?)",
            blob.len()
        );
    };
    if published.is_some_and(|p| p != id) {
        bail!("the coordinator relayed a different NCCL unique id from the one rank 0 sent");
    }
    Ok(id)
}
