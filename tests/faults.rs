//! Checkpoints, exact resume and fault tolerance, with real processes, real signals
//! (SIGTERM, SIGKILL) and loopback TCP. Every faulty run is compared with one
//! uninterrupted run of the same job: resuming from a committed checkpoint must reproduce
//! it bit for bit (losses and parameters).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bertrain_coordinator::faults;
use common::*;

const STEPS: u64 = 120;
const EVERY: u64 = 20;
const LIMIT: Duration = Duration::from_secs(300);

/// The job of these tests: dropout on (its streams must resume exactly too), a checkpoint
/// every 20 of 120 steps.
fn job(dir: &Path) -> PathBuf {
    write_job(dir, dataset(), 0.1)
}

fn sets() -> Vec<String> {
    vec![
        format!("train.max_steps={STEPS}"),
        format!("checkpoint.every_steps={EVERY}"),
        "eval.every_steps=40".into(),
    ]
}

fn launch_command(job: &Path, run_dir: &Path, extra: &[String]) -> std::process::Command {
    let mut c = bertrain();
    c.arg("launch").arg("--config").arg(job);
    c.arg("--set")
        .arg(format!("job.run_dir={}", run_dir.display()));
    for s in sets().iter().chain(extra) {
        c.arg("--set").arg(s);
    }
    c
}

/// The uninterrupted run every test compares with (made once, shared read-only).
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_dir("reference");
        let job = job(&dir);
        let out = run_bounded(launch_command(&job, &dir.join("run"), &[]), LIMIT);
        ok(&out);
        dir.join("run")
    })
}

fn assert_same_run(run: &Path, what: &str) {
    assert_same_as(run, reference(), what);
}

fn assert_same_as(run: &Path, reference: &Path, what: &str) {
    assert_eq!(
        step_losses(run),
        step_losses(reference),
        "{what}: per-step losses differ from the uninterrupted run"
    );
    assert!(
        final_weights(run) == final_weights(reference),
        "{what}: final parameters differ from the uninterrupted run"
    );
}

/// SIGTERM to `launch` (what Ctrl-C or a scheduler's preemption sends): the workers agree
/// on a step, checkpoint it and stop; `launch --resume` continues to the same result.
#[test]
fn interrupted_run_resumes_bit_for_bit() {
    reference();
    let tmp = TempDir::new("interrupt");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let mut first = Running::start(launch_command(&job, &run, &[]));
    wait_until(LIMIT, "10 steps", || steps_logged(&run) >= 10);
    first.signal(libc::SIGTERM);
    let status = first.wait(LIMIT);
    let log = first.output();
    assert!(
        !status.success(),
        "an interrupted job does not report success\n{log}"
    );
    let stopped_at = latest_checkpoint(&run).expect("a checkpoint was committed on the way out");
    assert!(
        (10..STEPS).contains(&stopped_at),
        "stopped at {stopped_at}\n{log}"
    );
    assert!(log.contains("continue with --resume"), "{log}");

    let mut resume = launch_command(&job, &run, &[]);
    resume.arg("--resume");
    let out = run_bounded(resume, LIMIT);
    ok(&out);
    assert!(
        describe(&out).contains(&format!("step={stopped_at}")),
        "resumed from the checkpoint\n{}",
        describe(&out)
    );
    assert_same_run(&run, "interrupted and resumed");
}

/// Resuming with another world size (same global batch) continues the epoch: over the
/// whole run, every sample is used exactly once.
#[test]
fn resume_at_another_world_size_uses_each_sample_once() {
    let data = dataset();
    let rows = dataset_rows(data);
    let steps = rows / 16; // one epoch, less the remainder of a batch
    assert!(steps >= 20, "the test dataset is too small ({rows} rows)");
    let tmp = TempDir::new("elastic");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let trace = tmp.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let max = format!("train.max_steps={steps}");

    let mut first = launch_command(&job, &run, std::slice::from_ref(&max));
    first.env("BERTRAIN_TRACE_SAMPLES", &trace);
    let mut first = Running::start(first);
    wait_until(LIMIT, "5 steps", || steps_logged(&run) >= 5);
    first.signal(libc::SIGTERM);
    first.wait(LIMIT);
    let stopped_at = latest_checkpoint(&run).expect("checkpoint on the way out");
    assert!(
        stopped_at < steps,
        "the first run must stop before the end ({stopped_at} of {steps})"
    );

    let mut second = launch_command(&job, &run, &[max, "cluster.world_size=1".into()]);
    second.arg("--resume").env("BERTRAIN_TRACE_SAMPLES", &trace);
    ok(&run_bounded(second, LIMIT));

    assert_each_sample_once(&trace, steps);
}

/// Reads the `BERTRAIN_TRACE_SAMPLES` files in `trace`: the first `steps` steps of the
/// epoch used 16 samples each and every sample once. A step that a lost generation began
/// counts in the generation that did it again.
fn assert_each_sample_once(trace: &Path, steps: u64) {
    let mut lines = Vec::new();
    for file in std::fs::read_dir(trace).unwrap().flatten() {
        for line in std::fs::read_to_string(file.path()).unwrap().lines() {
            let f: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            if f[0] < steps {
                lines.push((f[0], f[1], f[2], f[3]));
            }
        }
    }
    let mut last_generation = std::collections::BTreeMap::<u64, u64>::new();
    for &(step, _, _, generation) in &lines {
        let g = last_generation.entry(step).or_insert(generation);
        *g = (*g).max(generation);
    }
    let mut seen = std::collections::HashMap::new();
    let mut per_step = std::collections::BTreeMap::<u64, usize>::new();
    for &(step, shard, row, generation) in &lines {
        if last_generation[&step] == generation {
            *per_step.entry(step).or_default() += 1;
            *seen.entry((shard, row)).or_insert(0) += 1;
        }
    }
    assert_eq!(per_step.len() as u64, steps, "every step traced");
    assert!(
        per_step.values().all(|&n| n == 16),
        "16 samples per step over all ranks: {per_step:?}"
    );
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "samples used twice: {repeated:?}");
    assert_eq!(
        seen.len() as u64,
        steps * 16,
        "every sample of the epoch's first {steps} batches used once"
    );
}

/// SIGKILL one worker of a `launch`ed job mid-run: the coordinator notices, the survivor
/// keeps its state, launch restarts the worker, and the next generation continues from the
/// survivor's state: no step is redone, and the job ends exactly as the uninterrupted run.
#[test]
fn killed_worker_is_replaced_from_its_peer_and_the_result_is_exact() {
    reference();
    let tmp = TempDir::new("kill-worker");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let mut launch = Running::start(launch_command(&job, &run, &[]));
    // Past a checkpoint, so that going back to it would redo steps.
    wait_until(LIMIT, "a committed checkpoint and a few steps more", || {
        latest_checkpoint(&run).is_some()
            && step_losses(&run)
                .last()
                .is_some_and(|&(s, _)| s % EVERY > 3)
    });
    let workers = children_with(launch.pid(), "worker");
    assert_eq!(workers.len(), 2, "{}", launch.output());
    let killed_at = unix_now();
    // SAFETY: kill(2) on a process of this test's job.
    unsafe { libc::kill(workers[1] as libc::pid_t, libc::SIGKILL) };
    let status = launch.wait(LIMIT);
    let log = launch.output();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("starting it again"),
        "launch restarted the worker\n{log}"
    );
    let (failed, restarted) = assert_continued_from_a_survivor(&run, &log);
    let start_step = restarted["start_step"].as_u64().unwrap();
    // Figures (not assertions): from the kill to the coordinator noticing, to the next
    // generation starting, and to its first step's report (journal and metrics timestamps).
    let first_step = metrics(&run)
        .into_iter()
        .find(|v| v.get("split").is_none() && v["step"].as_u64() == Some(start_step + 1))
        .and_then(|v| v["time"].as_f64())
        .unwrap();
    eprintln!(
        "worker SIGKILL at step {start_step}: noticed after {:.2} s; next generation ({}) after {:.2} s; its first step done after {:.2} s",
        failed["time"].as_f64().unwrap() - killed_at,
        restarted["source"],
        restarted["time"].as_f64().unwrap() - killed_at,
        first_step - killed_at,
    );
    assert_same_run(&run, "worker killed");
}

/// Three workers; one dies in the middle of the all-gather of a step, after the segments
/// its successor needs to pass on: of the two survivors, one completes the step and the
/// other fails it. The coordinator continues from the newer of their states (the step
/// completed), and the job ends exactly as an uninterrupted run of three. The metrics line
/// of that one step is missing: the dead rank's share of its loss died with it.
#[test]
fn all_reduce_completed_on_some_ranks_only_continues_from_the_newest() {
    let tmp = TempDir::new("partial-all-reduce");
    let job = job(tmp.path());
    let three = [
        "cluster.world_size=3".to_string(),
        "train.global_batch_size=24".to_string(),
        "train.max_steps=40".to_string(),
    ];
    let uninterrupted = tmp.path().join("uninterrupted");
    ok(&run_bounded(
        launch_command(&job, &uninterrupted, &three),
        LIMIT,
    ));
    let run = tmp.path().join("run");
    let mut launch = launch_command(&job, &run, &three);
    let fault = 25;
    launch.env(
        faults::DIE_IN_ALL_GATHER,
        format!("{fault}:{}", tmp.path().join("died").display()),
    );
    let out = run_bounded(launch, LIMIT);
    ok(&out);
    let log = describe(&out);
    let (_, restarted) = assert_continued_from_a_survivor(&run, &log);
    let mut held: Vec<u64> = restarted["held"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_u64())
        .collect();
    held.sort();
    assert_eq!(held, [fault, fault + 1], "the survivors' steps\n{log}");
    assert_eq!(restarted["start_step"].as_u64(), Some(fault + 1), "{log}");
    let mut expected = step_losses(&uninterrupted);
    expected.retain(|&(step, _)| step != fault + 1);
    assert_eq!(
        step_losses(&run),
        expected,
        "losses, but for step {}",
        fault + 1
    );
    assert!(
        final_weights(&run) == final_weights(&uninterrupted),
        "final parameters differ from the uninterrupted run"
    );
}

/// An elastic job (`min_workers = 1`) loses a worker that goes silent (SIGSTOP). After
/// `rejoin_timeout_s` it goes on alone at the same global batch; when the worker is back
/// (SIGCONT), the job takes it in at the next step boundary. Every sample of the epoch is
/// used once, and the run ends where the uninterrupted one did, up to float rounding (only
/// the order of the gradient sums differs).
#[test]
fn elastic_job_shrinks_and_grows_back() {
    reference();
    let tmp = TempDir::new("shrink-grow");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let trace = tmp.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let elastic = [
        "cluster.min_workers=1".to_string(),
        "cluster.rejoin_timeout_s=1".to_string(),
        "cluster.heartbeat_interval_s=0.2".to_string(),
        "cluster.heartbeat_timeout_s=2".to_string(),
    ];
    let mut launch = launch_command(&job, &run, &elastic);
    launch.env("BERTRAIN_TRACE_SAMPLES", &trace);
    let mut launch = Running::start(launch);
    wait_until(LIMIT, "a few steps", || steps_logged(&run) > 5);
    let workers = children_with(launch.pid(), "worker");
    assert_eq!(workers.len(), 2, "{}", launch.output());
    // SAFETY: kill(2) on a process of this test's job; SIGCONT follows below.
    unsafe { libc::kill(workers[1] as libc::pid_t, libc::SIGSTOP) };
    let generations = |run: &Path| -> Vec<u64> {
        journal(run)
            .iter()
            .filter(|v| v["event"] == "generation_started")
            .map(|v| v["world_size"].as_u64().unwrap())
            .collect()
    };
    wait_until(LIMIT, "a generation of one worker", || {
        generations(&run).last() == Some(&1)
    });
    let alone_from = steps_logged(&run);
    wait_until(LIMIT, "steps with one worker", || {
        steps_logged(&run) >= alone_from + 10
    });
    // SAFETY: as above.
    unsafe { libc::kill(workers[1] as libc::pid_t, libc::SIGCONT) };
    let status = launch.wait(LIMIT);
    let log = launch.output();
    assert!(status.success(), "{log}");
    assert_eq!(generations(&run), [2, 1, 2], "{log}");
    assert!(
        journal(&run)
            .iter()
            .any(|v| v["event"] == "generation_regrouped"),
        "{log}"
    );
    assert_each_sample_once(&trace, STEPS.min(dataset_rows(dataset()) / 16));
    let (losses, expected) = (step_losses(&run), step_losses(reference()));
    assert_eq!(losses.len(), expected.len());
    // A step whose all-reduce completed just before the SIGSTOP, but whose report the
    // stopped rank never sent, is logged from the survivor's re-sent share alone, marked
    // partial: its loss is half the batch's, so only whole steps are compared.
    let partial: Vec<u64> = metrics(&run)
        .iter()
        .filter(|v| v.get("partial").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert!(partial.len() <= 1, "partial steps {partial:?}");
    let worst_loss = losses
        .iter()
        .zip(&expected)
        .map(|(&(s, a), &(t, b))| {
            assert_eq!(s, t);
            if partial.contains(&s) {
                0.0
            } else {
                (a - b).abs() / b.abs()
            }
        })
        .fold(0.0, f64::max);
    let worst_weight = final_weights(&run)
        .iter()
        .zip(final_weights(reference()))
        .flat_map(|((_, a), (_, b))| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max);
    eprintln!(
        "shrink to 1 worker and back: largest relative loss difference {worst_loss:.2e}, largest parameter difference {worst_weight:.2e}"
    );
    assert!(worst_loss < 1e-4, "losses drifted by {worst_loss}");
    assert!(worst_weight < 1e-4, "parameters drifted by {worst_weight}");
}

/// The second generation's record in the journal and the failure before it; asserts that
/// it continued from a survivor's state, at or after the last step any rank reported (no
/// step redone).
fn assert_continued_from_a_survivor(
    run: &Path,
    log: &str,
) -> (serde_json::Value, serde_json::Value) {
    let journal = journal(run);
    let failed = journal
        .iter()
        .find(|v| v["event"] == "generation_failed")
        .unwrap_or_else(|| panic!("no failed generation in the journal\n{log}"))
        .clone();
    let restarted = journal
        .iter()
        .find(|v| v["event"] == "generation_started" && v["generation"] == 2)
        .unwrap_or_else(|| panic!("no second generation in the journal\n{log}"))
        .clone();
    assert!(
        restarted["source"].as_str().unwrap().ends_with("kept"),
        "the survivor's state, not a checkpoint: {restarted}\n{log}"
    );
    // A survivor may have completed a step whose report the coordinator did not get
    // before the failure: it continues after it, never before the last reported step.
    assert!(
        restarted["start_step"].as_u64() >= failed["last_step"].as_u64(),
        "steps redone: {failed} then {restarted}\n{log}"
    );
    (failed, restarted)
}

/// SIGSTOP one worker: it stays connected but says nothing. The heartbeat timeout finds it,
/// the survivor leaves the all-reduce it was waiting in, and once the silent worker is
/// continued (SIGCONT) it finds its generation gone and rejoins with its state: no step is
/// redone, and the job ends exactly as the uninterrupted run.
#[test]
fn silent_worker_is_found_by_the_heartbeat_timeout() {
    reference();
    let tmp = TempDir::new("silent-worker");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let timeouts = [
        "cluster.heartbeat_interval_s=0.2".to_string(),
        "cluster.heartbeat_timeout_s=3".to_string(),
    ];
    let mut launch = Running::start(launch_command(&job, &run, &timeouts));
    wait_until(LIMIT, "a few steps", || steps_logged(&run) > 5);
    let workers = children_with(launch.pid(), "worker");
    assert_eq!(workers.len(), 2, "{}", launch.output());
    let stopped_at = unix_now();
    // SAFETY: kill(2) on a process of this test's job; SIGCONT follows below.
    unsafe { libc::kill(workers[1] as libc::pid_t, libc::SIGSTOP) };
    wait_until(LIMIT, "the coordinator to notice", || {
        journal(&run)
            .iter()
            .any(|v| v["event"] == "generation_failed")
    });
    let noticed_at = unix_now();
    // SAFETY: as above.
    unsafe { libc::kill(workers[1] as libc::pid_t, libc::SIGCONT) };
    let status = launch.wait(LIMIT);
    let log = launch.output();
    assert!(status.success(), "{log}");
    let (failed, restarted) = assert_continued_from_a_survivor(&run, &log);
    assert!(
        failed["reason"].as_str().unwrap().contains("silent for"),
        "{failed}"
    );
    eprintln!(
        "worker SIGSTOP: noticed after {:.2} s (heartbeat_timeout_s = 3); after SIGCONT, the next generation started in {:.2} s",
        failed["time"].as_f64().unwrap() - stopped_at,
        restarted["time"].as_f64().unwrap() - noticed_at,
    );
    assert_same_run(&run, "worker silent");
}

/// A worker whose training thread hangs (its heartbeats go on, its peer waits in the
/// all-reduce): the step timeout finds it, the coordinator stops the generation, the hung
/// worker exits when it cannot leave its step, launch starts it again, and the job goes on
/// from the survivor's state to exactly the uninterrupted run's end.
#[test]
fn hung_collective_is_found_by_the_step_timeout() {
    reference();
    let tmp = TempDir::new("hung");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let timeouts = [
        "cluster.step_timeout_s=6".to_string(),
        "cluster.heartbeat_interval_s=0.2".to_string(),
        "cluster.heartbeat_timeout_s=2".to_string(),
    ];
    let mut launch = launch_command(&job, &run, &timeouts);
    let hang = EVERY + 5;
    launch.env(
        faults::HANG_IN_STEP,
        format!("{hang}:{}", tmp.path().join("hung").display()),
    );
    let out = run_bounded(launch, LIMIT);
    let log = describe(&out);
    ok(&out);
    let (failed, restarted) = assert_continued_from_a_survivor(&run, &log);
    // The coordinator's step timeout, or the ring's read timeout (also step_timeout_s) on
    // the rank waiting for the hung one, whichever fires first.
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("(cluster.step_timeout_s"),
        "{failed}"
    );
    assert_eq!(restarted["start_step"].as_u64(), Some(hang));
    assert!(log.contains("did not come back"), "{log}");
    assert!(log.contains("starting it again"), "{log}");
    assert_same_run(&run, "hung collective");
}

/// A tmpfs mounted for one test, unmounted when dropped (mounting needs root, which the
/// test machines and CI have).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", describe(&out));
        Tmpfs(at.to_path_buf())
    }

    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: statvfs(3) fills the zeroed struct for a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The run directory's disk fills up after the first checkpoint: the checkpoints that no
/// longer fit fail (nothing partial is left), training goes on, and the job, whose end is
/// not saved, fails saying so. The committed checkpoint stays; once there is room again,
/// `--resume` continues from it to exactly the uninterrupted run's end.
#[test]
fn full_disk_keeps_the_committed_checkpoint_and_the_job_resumes() {
    reference();
    let tmp = TempDir::new("disk-full");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    // A checkpoint of this model is about 1.1 MB.
    let disk = Tmpfs::mount(&run, 16 << 20);
    let mut launch = Running::start(launch_command(&job, &run, &[]));
    wait_until(LIMIT, "the first checkpoint", || {
        latest_checkpoint(&run).is_some()
    });
    // Leave room for the logs, not for another checkpoint.
    let filler = run.join("filler");
    let room = 256 << 10;
    std::fs::write(&filler, vec![0u8; (disk.free_bytes() - room) as usize]).unwrap();
    let status = launch.wait(LIMIT);
    let log = launch.output();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("No space left on device")
            && log.contains("could not be written")
            && log.contains("make room in job.run_dir and continue with --resume"),
        "{log}"
    );
    let committed = latest_checkpoint(&run).unwrap();
    assert!(committed < STEPS, "{log}");
    let entries: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries.iter().any(|e| e.contains("partial")),
        "a failed write left {entries:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    let mut resume = launch_command(&job, &run, &[]);
    resume.arg("--resume");
    let out = run_bounded(resume, LIMIT);
    ok(&out);
    assert!(
        describe(&out).contains(&format!("step-{committed:08}")),
        "resumed from the committed checkpoint\n{}",
        describe(&out)
    );
    assert_same_run(&run, "disk full");
    drop(disk);
}

/// SIGKILL the coordinator mid-run and start it again with --resume: the workers (started
/// by hand here, as a cluster's supervisor would) rejoin by themselves with the state they
/// kept, and the job ends exactly as the uninterrupted run.
#[test]
fn killed_coordinator_is_restarted_and_the_workers_rejoin() {
    coordinator_dies_and_is_restarted("kill-coordinator", None, |_| {});
}

/// The coordinator dies in the middle of committing a checkpoint (journaled, `latest` not
/// yet moved): after its restart every committed checkpoint is still there and valid, the
/// job goes on, and it ends exactly as the uninterrupted run.
#[test]
fn coordinator_dying_while_committing_loses_no_checkpoint() {
    coordinator_dies_and_is_restarted("crash-committing", Some(2 * EVERY), |run| {
        let committed: Vec<u64> = journal(run)
            .iter()
            .filter(|v| v["event"] == "checkpoint_committed")
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert!(committed.contains(&(2 * EVERY)), "{committed:?}");
        // keep_last = 3: the newest three of all that were committed are on disk, whole.
        for step in committed.iter().rev().take(3) {
            let dir = run.join(format!("checkpoints/step-{step:08}"));
            assert!(dir.join("COMMITTED").exists(), "{} is gone", dir.display());
        }
    });
}

/// Runs the job with a coordinator that dies (SIGKILL after the first checkpoint, or an
/// abort while committing the checkpoint of `crash_committing`) and one started again with
/// `--resume`; checks the result, then runs `check` on the run directory.
fn coordinator_dies_and_is_restarted(
    tag: &str,
    crash_committing: Option<u64>,
    check: impl FnOnce(&Path),
) {
    reference();
    let tmp = TempDir::new(tag);
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let coordinator = |resume: bool| {
        let mut c = coordinator_command(&job, &addr, &http, &run, &sets());
        if resume {
            c.arg("--resume");
        }
        if let Some(step) = crash_committing {
            let marker = tmp.path().join("crashed");
            c.env(
                faults::CRASH_COMMITTING_CHECKPOINT,
                format!("{step}:{}", marker.display()),
            );
        }
        Running::start(c)
    };
    let mut first = coordinator(false);
    let token = run.join("token");
    wait_until(LIMIT, "the job token", || token.exists());
    let mut workers = start_workers(2, &addr, &token);
    if crash_committing.is_none() {
        wait_until(LIMIT, "a committed checkpoint", || {
            latest_checkpoint(&run).is_some()
        });
        first.signal(libc::SIGKILL);
    }
    let status = first.wait(LIMIT);
    assert!(!status.success(), "{}", first.output());
    let committed = latest_checkpoint(&run).unwrap();
    let mut second = coordinator(true);
    let status = second.wait(LIMIT);
    assert!(status.success(), "{}", second.output());
    for w in &mut workers {
        let status = w.wait(LIMIT);
        assert!(status.success(), "{}", w.output());
    }
    // The workers outlived the coordinator with their state: the job goes on from it, not
    // from the checkpoint.
    let resumed = journal(&run)
        .into_iter()
        .rfind(|v| v["event"] == "generation_started")
        .unwrap();
    assert!(
        resumed["source"].as_str().unwrap().ends_with("kept")
            && resumed["start_step"].as_u64().unwrap() >= committed,
        "{resumed}\n{}",
        second.output()
    );
    assert_same_run(&run, tag);
    check(&run);
}

/// Opens one malformed or unauthenticated connection of kind `kind` to the coordinator at
/// `addr` and sends its junk; `None` if nothing listens there any more.
fn junk_connection(addr: &str, kind: u64) -> Option<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let junk = match kind % 7 {
        // Says nothing.
        0 => Vec::new(),
        // Random bytes.
        1 => (0..64u8).map(|i| i.wrapping_mul(37) ^ kind as u8).collect(),
        // A header announcing the largest frame, then nothing.
        2 => u32::MAX.to_be_bytes().to_vec(),
        // A wrong token.
        3 => frame(br#"{"type":"hello","token":"guess","protocol_version":2}"#),
        // A join without a hello.
        4 => frame(br#"{"type":"join","host":"x","collective_addr":"x:1","model_hash":"m","dataset_hash":"d","held_step":null}"#),
        // Not JSON.
        5 => frame(b"{{{{"),
        // A truncated frame.
        _ => vec![0, 0, 1, 0, b'{'],
    };
    let _ = s.write_all(&junk);
    let _ = s.set_nonblocking(true);
    Some(s)
}

/// Whether the coordinator has closed `s` (a non-blocking read sees the end or an error).
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Malformed and unauthenticated connections flood the coordinator while a job trains: it
/// closes them and the job ends exactly as the undisturbed run.
#[test]
fn flood_of_bad_connections_leaves_the_job_unharmed() {
    reference();
    let tmp = TempDir::new("flood");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    let addr = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut coordinator = Running::start(coordinator_command(&job, &addr, &http, &run, &sets()));
    let token = run.join("token");
    wait_until(LIMIT, "the job token", || token.exists());
    let mut workers = start_workers(2, &addr, &token);
    wait_until(LIMIT, "the first step", || steps_logged(&run) > 0);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::time::Instant::now();
    let flooders: Vec<_> = (0..3u64)
        .map(|t| {
            let (addr, done) = (addr.clone(), done.clone());
            std::thread::spawn(move || {
                // Connections stay open until the coordinator closes them (or 200 are
                // open: then this thread drops the oldest).
                let (mut tried, mut closed, mut open) = (0u64, 0u64, Vec::new());
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let Some(s) = junk_connection(&addr, tried * 3 + t) else {
                        break;
                    };
                    tried += 1;
                    open.push(s);
                    let before = open.len();
                    open.retain_mut(|s| !closed_by_peer(s));
                    closed += (before - open.len()) as u64;
                    if open.len() > 200 {
                        open.remove(0);
                    }
                }
                (tried, closed)
            })
        })
        .collect();
    let status = coordinator.wait(LIMIT);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    let (tried, closed) = flooders
        .into_iter()
        .map(|f| f.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    eprintln!(
        "flood: {tried} bad connections in {seconds:.1} s ({:.0}/s), {closed} closed by the coordinator ({:.0}/s) while the job trained",
        tried as f64 / seconds,
        closed as f64 / seconds
    );
    assert!(status.success(), "{}", coordinator.output());
    for w in &mut workers {
        let status = w.wait(LIMIT);
        assert!(status.success(), "{}", w.output());
    }
    assert!(
        tried > 100,
        "the flood was too small to mean anything: {tried}"
    );
    assert_same_run(&run, "flooded");
}

/// A worker dies while writing a checkpoint: the partial one is never used (the job
/// continues from the survivor's state; the previous committed checkpoint stays) and the
/// job ends exactly as uninterrupted.
#[test]
fn crash_while_writing_a_checkpoint_keeps_the_previous_one() {
    reference();
    let tmp = TempDir::new("crash-writing");
    let job = job(tmp.path());
    let run = tmp.path().join("run");
    // Every worker carries the fault (only rank 0 writes checkpoints, so it is the one to
    // die); it fires once, and launch restarts the dead worker.
    let crash = 2 * EVERY;
    let marker = tmp.path().join("crashed");
    let mut launch = launch_command(&job, &run, &[]);
    launch.env(
        faults::CRASH_WRITING_CHECKPOINT,
        format!("{crash}:{}", marker.display()),
    );
    let out = run_bounded(launch, LIMIT);
    ok(&out);
    let log = describe(&out);
    assert!(
        log.contains("dying in the middle of the checkpoint write"),
        "{log}"
    );
    let restarted = journal(&run)
        .into_iter()
        .find(|v| v["event"] == "generation_started" && v["generation"] == 2)
        .unwrap_or_else(|| panic!("no second generation\n{log}"));
    // The write runs in the background, so rank 0 may finish a step or two more before it
    // dies; the survivor's state is then that newer step. Never the checkpoint before.
    let start = restarted["start_step"].as_u64().unwrap();
    assert!(
        (crash..crash + EVERY).contains(&start),
        "continued from the step of the crash or just after it, not from step {}: {start}\n{log}",
        crash - EVERY
    );
    assert!(
        restarted["source"].as_str().unwrap().ends_with("kept"),
        "from the survivor's state: {restarted}\n{log}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the partial write was cleaned up: {leftovers:?}"
    );
    // A step that finished after the write began and before the crash may not have had its
    // loss reported (as when an all-reduce completes on some ranks only); every loss that
    // was reported is the uninterrupted run's, and only those steps may lack one.
    let expected = step_losses(reference());
    let got = step_losses(&run);
    let reported = |losses: &[(u64, f64)]| -> Vec<(u64, f64)> {
        let uncertain = |step: u64| step > crash && step <= start;
        losses
            .iter()
            .copied()
            .filter(|&(step, _)| !uncertain(step) || got.iter().any(|&(s, _)| s == step))
            .collect()
    };
    assert_eq!(
        reported(&got),
        reported(&expected),
        "crashed while checkpointing: per-step losses differ from the uninterrupted run"
    );
    assert!(
        final_weights(&run) == final_weights(reference()),
        "crashed while checkpointing: final parameters differ from the uninterrupted run"
    );
}

/// A damaged newest checkpoint (one flipped byte) and a truncated one before it: resume
/// reports both and falls back to the one before; export refuses the damaged one.
#[test]
fn damaged_checkpoints_are_refused_and_resume_falls_back() {
    let reference = reference();
    let tmp = TempDir::new("damaged");
    let run = tmp.path().join("run");
    copy_dir(reference, &run);
    let job = job(tmp.path());
    let newest = run.join(format!("checkpoints/step-{STEPS:08}"));
    let before = run.join(format!("checkpoints/step-{:08}", STEPS - EVERY));
    let model = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let optimizer = before.join("optimizer.safetensors");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&optimizer)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let mut export = bertrain();
    export
        .arg("export")
        .arg("--checkpoint")
        .arg(&newest)
        .arg("--output")
        .arg(tmp.path().join("hf"));
    let out = run_bounded(export, LIMIT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");

    let mut resume = launch_command(&job, &run, &[]);
    resume.arg("--resume");
    let out = run_bounded(resume, LIMIT);
    ok(&out);
    let log = describe(&out);
    assert!(
        log.contains(&format!("skipping checkpoint {}", newest.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("skipping checkpoint {}", before.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("step={}", STEPS - 2 * EVERY)),
        "resumed from the third newest\n{log}"
    );
    assert_same_run(&run, "resumed past damaged checkpoints");
}

fn journal(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
