//! Fault injection for the fault tests (`tests/faults.rs`): off, and free, unless the
//! process has the variable set. Each fault fires once per job: `VAR=STEP:MARKER` fires at
//! `STEP` only if the file `MARKER` does not exist yet, and creates it first, so a process
//! started again with the same environment (by `launch`) runs normally.

use std::fs::File;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The worker dies (abort: no cleanup, like a SIGKILL) halfway through writing the
/// checkpoint of the step.
pub const CRASH_WRITING_CHECKPOINT: &str = "BERTRAIN_CRASH_WRITING_STEP";
/// The worker's training thread hangs forever at the start of the step (its heartbeats go
/// on, its peers wait in the all-reduce): a hung collective, as a deadlocked kernel or
/// driver call makes.
pub const HANG_IN_STEP: &str = "BERTRAIN_HANG_STEP";
/// The coordinator dies (abort) in the middle of committing the checkpoint of the step:
/// after journaling it, before pointing `latest` at it and pruning.
pub const CRASH_COMMITTING_CHECKPOINT: &str = "BERTRAIN_CRASH_COMMITTING_STEP";

/// The worker dies in the all-reduce of the step, after it has sent the first all-gather
/// step's segments and waited a second (so that they are passed on), before the rest: of
/// the survivors, its successor in the ring fails the step and the rank after completes
/// it. Needs a ring of three or more.
pub const DIE_IN_ALL_GATHER: &str = "BERTRAIN_DIE_IN_ALL_GATHER_STEP";

/// The step this process is training, for faults that fire deep in the collective.
static STEP: AtomicU64 = AtomicU64::new(0);

/// Records the step the worker is about to train (see [`due_now`]).
pub fn at_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// [`due`] at the step last given to [`at_step`].
pub fn due_now(var: &str) -> bool {
    due(var, STEP.load(Ordering::Relaxed))
}

/// Whether the fault `var` is set for `step` and has not fired yet (it counts as fired
/// from now on).
pub fn due(var: &str, step: u64) -> bool {
    if !armed() {
        return false;
    }
    let Ok(spec) = std::env::var(var) else {
        return false;
    };
    let Some((at, marker)) = spec.split_once(':') else {
        return false;
    };
    if at.trim() == step.to_string() && File::create_new(marker).is_ok() {
        eprintln!("{var}={step}: injecting the fault");
        return true;
    }
    false
}

/// Whether any fault is set for this process, read once: the training step and the ring
/// ask every step, and then pay one load.
fn armed() -> bool {
    static ARMED: OnceLock<bool> = OnceLock::new();
    *ARMED.get_or_init(|| {
        [
            CRASH_WRITING_CHECKPOINT,
            HANG_IN_STEP,
            CRASH_COMMITTING_CHECKPOINT,
            DIE_IN_ALL_GATHER,
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    })
}
