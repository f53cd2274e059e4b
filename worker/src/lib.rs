//! The worker: one process per device. It joins the job, streams its slice of the data,
//! trains a replica of the model and averages gradients with the other workers.
//!
//! Data flows through the modules in this order: `batch` (collation) -> `trainer`
//! (forward/backward) -> [`collective`] (all-reduce) -> `optim` (update, with the
//! learning rate from `schedule`). `node` is the `bertrain worker` process that drives
//! them, on the backend `device` picks.

mod batch;
mod checkpoint;
pub mod collective;
mod device;
mod eval;
mod loader;
mod node;
pub mod optim;
mod plan;
mod prepare;
mod resident;
mod schedule;
mod survivor;
mod throughput;
mod trainer;

pub use batch::HostBatch;
pub use checkpoint::{PendingWrite, Snapshot};
pub use device::{DeviceChoice, OnBackend, peak, set_precision, with_backend};
pub use loader::{BatchShape, SampleSource, step_data};
pub use node::{WorkerArgs, run};
pub use optim::{Optimizer, OptimizerConfig, OptimizerState};
pub use resident::DeviceMaster;
pub use schedule::LrSchedule;
pub use trainer::Trainer;

/// The CPU training backend: burn's Flex (pure Rust, measured fastest here) with autodiff.
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// Set to `padded` in a worker's environment, it trains with the padded encoder instead of
/// the unpadded one (the same function, more work): for benchmarks that compare the two.
pub const PADDED_FORWARD_ENV: &str = "BERTRAIN_FORWARD";

#[cfg(test)]
mod job_keys_test;
