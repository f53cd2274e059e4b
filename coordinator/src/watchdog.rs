//! When the coordinator stops waiting, from the job's `[cluster]` section: for a silent
//! worker, for the next step, for another restart, and for lost workers to come back.

use std::time::Duration;

use crate::job::ClusterSection;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Watchdog {
    /// How often each worker says it is alive (`heartbeat_interval_s`).
    pub heartbeat: Duration,
    /// A worker connection silent this long is declared dead (`heartbeat_timeout_s`).
    pub silence: Duration,
    /// No step completed for this long is a hung generation; after a restart, the time the
    /// workers have to rejoin (`step_timeout_s`).
    pub step_timeout: Duration,
    /// Restarts of the worker set before the job is given up (`max_restarts`).
    pub max_restarts: u32,
    /// The fewest workers an elastic job trains with (`min_workers`; the world size when
    /// the job is not elastic).
    pub min_workers: usize,
    /// How long an elastic job waits for lost workers before it goes on without them
    /// (`rejoin_timeout_s`).
    pub rejoin_timeout: Duration,
}

impl Watchdog {
    pub fn from_job(c: &ClusterSection) -> Watchdog {
        Watchdog {
            heartbeat: Duration::from_secs_f64(c.heartbeat_interval_s),
            silence: Duration::from_secs_f64(c.heartbeat_timeout_s),
            step_timeout: Duration::from_secs_f64(c.step_timeout_s),
            max_restarts: c.max_restarts,
            min_workers: c.min_workers.unwrap_or(c.world_size) as usize,
            rejoin_timeout: Duration::from_secs_f64(c.rejoin_timeout_s),
        }
    }

    /// Whether `since_progress` without a completed step (or a rejoin) is too long.
    pub fn stalled(&self, since_progress: Duration) -> bool {
        since_progress > self.step_timeout
    }

    /// Whether the job may restart its workers once more after `restarts_done` restarts.
    pub fn may_restart(&self, restarts_done: u32) -> bool {
        restarts_done < self.max_restarts
    }
}
