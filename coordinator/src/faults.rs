//! Fault injection for the fault tests (`tests/faults.rs`): off, and free, unless the
//! process has the variable set. Each fault fires once per job: `VAR=STEP:MARKER` fires at
//! `STEP` only if the file `MARKER` does not exist yet, and creates it first, so a process
//! started again with the same environment (by `launch`) runs normally.

use std::fs::File;

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

/// Whether the fault `var` is set for `step` and has not fired yet (it counts as fired
/// from now on).
pub fn due(var: &str, step: u64) -> bool {
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
