//! bertrain's coordinator: the job file, the data order, the coordinator <-> worker
//! protocol with both of its ends, the HTTP status server, and `launch`.

pub mod checkpoints;
mod client;
pub mod faults;
mod http;
pub mod job;
pub mod job_keys;
mod journal;
pub mod launch;
mod metrics;
pub mod protocol;
mod server;
mod signals;
mod status;
mod token;
mod watchdog;

pub use client::{Fingerprint, JoinInfo, WorkerClient, hostname};
pub use job::{JobConfig, Override};
pub use launch::LaunchArgs;
pub use protocol::{EvalMetrics, StepMetrics, Welcome};
pub use server::{Coordinator, CoordinatorArgs, load_job, run};
pub use token::read_token;
