//! Which keys of the job file the coordinator acts on. Every other key is the worker's, and
//! the worker's `job_keys` test requires that the two lists cover the whole job file, so a
//! key that nothing reads fails a test instead of being accepted and ignored.

/// Keys that the coordinator (or the client side of its protocol, in every worker) reads;
/// the test below shows that each one changes what it does.
pub const READ_BY_COORDINATOR: &[&str] = &[
    "job.name",
    "job.run_dir",
    "job.resume",
    "checkpoint.keep_last",
    "cluster.coordinator",
    "cluster.http",
    "cluster.world_size",
    "cluster.token_file",
    "cluster.heartbeat_interval_s",
    "cluster.heartbeat_timeout_s",
    "cluster.step_timeout_s",
    "cluster.max_restarts",
    "cluster.min_workers",
    "cluster.rejoin_timeout_s",
];

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::READ_BY_COORDINATOR;
    use crate::checkpoints::{self, COMMIT_MARKER};
    use crate::job::{JobConfig, Override};
    use crate::server::{listen_address, prune_checkpoints, resume_point, world_size};
    use crate::token::ensure_token;
    use crate::watchdog::Watchdog;

    const JOB: &str = "[model]\npreset = \"tiny\"\n[data]\nmanifest = \"data/manifest.json\"\n";

    /// One key: a value other than the default, and what the coordinator does with the job,
    /// written out so that two jobs can be compared. `scratch` is the jobs' directory.
    struct Probe {
        key: &'static str,
        value: &'static str,
        observe: fn(&JobConfig, &Path) -> String,
    }

    fn job(dir: &Path, set: Option<&str>) -> JobConfig {
        let overrides: Vec<Override> = set.into_iter().map(|s| s.parse().unwrap()).collect();
        JobConfig::from_toml_str(JOB, "job.toml", dir, &overrides).unwrap()
    }

    /// Five committed checkpoints in the default run directory, then the server's pruning.
    fn pruned(job: &JobConfig, scratch: &Path) -> String {
        let dir = checkpoints::checkpoints_dir(&scratch.join("runs/bertrain"));
        for step in 1..=5 {
            let step_dir = dir.join(checkpoints::step_dir_name(step));
            std::fs::create_dir_all(&step_dir).unwrap();
            std::fs::write(step_dir.join(COMMIT_MARKER), "").unwrap();
        }
        format!("{:?}", prune_checkpoints(job).unwrap())
    }

    fn probes() -> Vec<Probe> {
        let watchdog = |j: &JobConfig, _: &Path| {
            let w = Watchdog::from_job(&j.cluster);
            format!(
                "{:?} {:?} stalled after 600 s: {} restart after 3: {}",
                w.heartbeat,
                w.silence,
                w.stalled(Duration::from_secs(600)),
                w.may_restart(3)
            )
        };
        vec![
            Probe {
                key: "job.name",
                value: "other",
                observe: |j, _| j.job.run_dir.display().to_string(),
            },
            Probe {
                key: "job.run_dir",
                value: "\"elsewhere\"",
                observe: pruned,
            },
            Probe {
                key: "checkpoint.keep_last",
                value: "1",
                observe: pruned,
            },
            Probe {
                key: "job.resume",
                value: "auto",
                observe: |j, scratch| {
                    let run = scratch.join("runs/bertrain");
                    std::fs::create_dir_all(&run).unwrap();
                    std::fs::write(run.join("metrics.jsonl"), "").unwrap();
                    format!("{:?}", resume_point(j, "hash").map(|f| f.is_some()).is_ok())
                },
            },
            Probe {
                key: "cluster.coordinator",
                value: "\"127.0.0.1:4000\"",
                observe: |j, _| listen_address(None, j),
            },
            Probe {
                key: "cluster.http",
                value: "\"127.0.0.1:5000\"",
                observe: |j, _| j.http_address(&listen_address(None, j)).unwrap(),
            },
            Probe {
                key: "cluster.world_size",
                value: "2",
                observe: |j, _| world_size(j).to_string(),
            },
            Probe {
                key: "cluster.token_file",
                value: "\"secret\"",
                observe: |j, scratch| {
                    std::fs::write(scratch.join("secret"), "s3cret-s3cret-s3cret\n").unwrap();
                    let token = ensure_token(j).unwrap();
                    format!(
                        "the job's token is the file's: {}",
                        token.starts_with("s3cret")
                    )
                },
            },
            Probe {
                key: "cluster.heartbeat_interval_s",
                value: "2.0",
                observe: watchdog,
            },
            Probe {
                key: "cluster.heartbeat_timeout_s",
                value: "20.0",
                observe: watchdog,
            },
            Probe {
                key: "cluster.step_timeout_s",
                value: "300.0",
                observe: watchdog,
            },
            Probe {
                key: "cluster.max_restarts",
                value: "5",
                observe: watchdog,
            },
            Probe {
                key: "cluster.min_workers",
                value: "1",
                // With the job's world of 4 workers: how few it goes on with.
                observe: |j, _| {
                    let mut cluster = j.cluster.clone();
                    cluster.world_size = 4;
                    Watchdog::from_job(&cluster).min_workers.to_string()
                },
            },
            Probe {
                key: "cluster.rejoin_timeout_s",
                value: "5",
                observe: |j, _| format!("{:?}", Watchdog::from_job(&j.cluster).rejoin_timeout),
            },
        ]
    }

    /// Each key the coordinator claims changes what it does: the same observation on the
    /// default job and on the job with that key changed (each in a fresh directory) differs.
    #[test]
    fn every_coordinator_key_changes_what_it_does() {
        let probes = probes();
        let mut keys: Vec<&str> = probes.iter().map(|p| p.key).collect();
        keys.sort();
        let mut claimed = READ_BY_COORDINATOR.to_vec();
        claimed.sort();
        assert_eq!(keys, claimed, "one probe per key of READ_BY_COORDINATOR");
        for p in probes {
            let observe = |set: Option<&str>| {
                let scratch = tempfile::tempdir().unwrap();
                let job = job(scratch.path(), set);
                (p.observe)(&job, scratch.path())
            };
            let set = format!("{}={}", p.key, p.value);
            let (default, changed) = (observe(None), observe(Some(&set)));
            assert_ne!(default, changed, "--set {set} changed nothing: {default}");
        }
    }
}
