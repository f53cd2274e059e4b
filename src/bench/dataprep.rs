//! `bench dataprep`: `bertrain dataprep` as child processes, wall time and peak memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::parse_list;

/// The reference: the original Python generator on a 3.5 MB, 472-document English corpus
/// (seq 128, dupe_factor 5) on this 2-core machine.
pub(super) const DATAPREP_REFERENCE_S: f64 = 13.2;
pub(super) const DATAPREP_REFERENCE_MB: f64 = 188.0;
pub(super) const DATAPREP_DOCS: usize = 472;

pub(super) fn bench_dataprep(work_dir: &Path, threads: &str, rounds: usize) -> Result<()> {
    let threads: Vec<usize> = parse_list(threads, "--threads")?;
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    in_work_dir(work_dir, |dir| dataprep_table(dir, &threads, rounds))
}

/// Runs `f` in `work_dir` (absolute), which must not exist yet and is removed afterwards.
pub(super) fn in_work_dir(work_dir: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if work_dir.exists() {
        bail!(
            "{} exists; choose another --work-dir (the benchmark removes it when done)",
            work_dir.display()
        );
    }
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let dir = work_dir.canonicalize()?;
    let result = f(&dir);
    std::fs::remove_dir_all(&dir).ok();
    result
}

pub(super) fn dataprep_table(dir: &Path, threads: &[usize], rounds: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    // Long documents (90-162 sentences): 472 of them make the reference's 3.5 MB.
    let corpus = |name: &str, docs: usize| -> Result<PathBuf> {
        let path = dir.join(name);
        let options = bertrain_dataprep::SynthOptions {
            docs,
            seed: 1,
            min_sentences: 90,
            max_sentences: 162,
        };
        // Streamed to the file: a child's peak RSS as `wait4` reports it starts from this
        // process's RSS (the child is spawned from its memory image), so this process must
        // never hold a corpus.
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for (i, doc) in bertrain_dataprep::synth_corpus_with(options).enumerate() {
            if i > 0 {
                out.write_all(b"\n\n")?;
            }
            out.write_all(doc.as_bytes())?;
        }
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(path)
    };
    let small = corpus("corpus-1x.txt", DATAPREP_DOCS)?;
    let large = corpus("corpus-10x.txt", 10 * DATAPREP_DOCS)?;
    let vocab = dir.join("vocab.txt");
    let (status, _) = run_measured(
        Command::new(&exe)
            .args(["vocab", "--vocab-size", "30522", "--input"])
            .arg(&small)
            .arg("--output")
            .arg(&vocab),
    )?;
    if !status {
        bail!("training the benchmark vocabulary failed");
    }
    let vocab_size = std::fs::read_to_string(&vocab)?.lines().count();
    let mb = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6);
    println!(
        "dataprep: seq 128, dupe_factor 5, {vocab_size}-token vocab; reference: original Python generator, {:.1} s, {:.0} MB peak",
        DATAPREP_REFERENCE_S, DATAPREP_REFERENCE_MB
    );
    println!(
        "{:<8} {:>6} {:>8} {:>9} {:>7} {:>8} {:>10} {:>9} {:>8} {:>8}",
        "corpus",
        "MB",
        "threads",
        "wall s",
        "cores",
        "MB/s",
        "vs Python",
        "scaling",
        "ceiling",
        "peak MB"
    );
    let dataprep = |path: &Path, threads: usize, out: &Path| {
        let mut command = Command::new(&exe);
        command
            .args(["dataprep", "--quiet", "--dupe-factor", "5"])
            .args(["--max-seq-len", "128", "--threads", &threads.to_string()])
            .arg("--input")
            .arg(path)
            .arg("--vocab")
            .arg(&vocab)
            .arg("--output")
            .arg(out);
        command
    };
    let mut peaks = Vec::new();
    for (name, path) in [("1x", &small), ("10x", &large)] {
        // Rounds alternate between thread counts, so that a slow spell of this noisy machine
        // does not land on one row only.
        let mut runs: Vec<Vec<ChildRun>> = threads.iter().map(|_| Vec::new()).collect();
        // For each thread count t above 1: wall times of t one-thread runs at once.
        let mut together: Vec<Vec<f64>> = threads.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for ((&t, runs), together) in threads.iter().zip(&mut runs).zip(&mut together) {
                let out = dir.join(format!("out-{name}-{t}"));
                let (ok, run) = run_measured(&mut dataprep(path, t, &out))?;
                if !ok {
                    bail!("dataprep on the {name} corpus failed");
                }
                runs.push(run);
                std::fs::remove_dir_all(&out).ok();
                if t > 1 {
                    let outs: Vec<PathBuf> = (0..t)
                        .map(|i| dir.join(format!("out-{name}-{t}-copy{i}")))
                        .collect();
                    let commands = outs.iter().map(|out| dataprep(path, 1, out)).collect();
                    together.push(run_together(commands)?);
                    for out in &outs {
                        std::fs::remove_dir_all(out).ok();
                    }
                }
            }
        }
        let size = mb(path)?;
        // The median run by wall time, and the wall time at the first thread count for the
        // scaling column.
        let median = |mut walls: Vec<f64>| {
            walls.sort_by(f64::total_cmp);
            walls[walls.len() / 2]
        };
        let mut first_wall = None;
        let mut one_thread_wall = None;
        for ((&t, mut runs), together) in threads.iter().zip(runs).zip(together) {
            runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
            let peak = runs.iter().map(|r| r.peak_mb).fold(0.0, f64::max);
            let run = &runs[runs.len() / 2];
            let wall = run.wall_s;
            if t == 1 {
                one_thread_wall = Some(wall);
            }
            let speedup = if name == "1x" {
                format!("{:.0}x", DATAPREP_REFERENCE_S / wall)
            } else {
                "-".into()
            };
            let scaling = *first_wall.get_or_insert(wall) / wall;
            // What this machine gives t independent one-thread runs: the scaling that
            // perfect parallel code would reach here (shared caches, memory bandwidth and
            // neighbours on the host all count).
            let ceiling = match one_thread_wall {
                Some(one) if t > 1 => format!("{:.2}x", t as f64 * one / median(together)),
                _ => "-".into(),
            };
            println!(
                "{name:<8} {size:>6.1} {t:>8} {wall:>9.3} {:>7.2} {:>8.1} {speedup:>10} {scaling:>8.2}x {ceiling:>8} {peak:>8.0}",
                run.cpu_s / wall,
                size / wall
            );
            peaks.push((name, t, peak));
        }
    }
    println!(
        "median of {rounds} runs per row; cores = CPU time / wall time; ceiling = N one-thread runs at once against one alone, \
         what this machine allows N threads; peak MB = the highest max RSS of the row's runs"
    );
    let last = *threads.last().unwrap_or(&2);
    let peak_of = |n: &str| peaks.iter().find(|p| p.0 == n && p.1 == last).map(|p| p.2);
    if let (Some(a), Some(b)) = (peak_of("1x"), peak_of("10x")) {
        println!(
            "peak memory 10x / 1x corpus at {last} threads: {:.2}",
            b / a
        );
    }
    Ok(())
}

/// What a benchmark child used.
pub(super) struct ChildRun {
    wall_s: f64,
    /// User plus system CPU time.
    cpu_s: f64,
    /// Peak resident memory.
    peak_mb: f64,
}

/// Runs the commands at once and returns the wall time until the last one ends. Every child
/// started is waited for, also when another fails to start.
pub(super) fn run_together(commands: Vec<Command>) -> Result<f64> {
    let started = Instant::now();
    let mut children = Vec::new();
    let mut failure = None;
    for mut command in commands {
        match command.stdout(std::process::Stdio::null()).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                failure = Some(anyhow::Error::new(e).context("starting a benchmark child"));
                break;
            }
        }
    }
    for child in &mut children {
        if failure.is_some() {
            child.kill().ok();
        }
        match child.wait() {
            Ok(status) if !status.success() && failure.is_none() => {
                failure = Some(anyhow::anyhow!(
                    "a concurrent dataprep run failed ({status})"
                ));
            }
            Err(e) if failure.is_none() => failure = Some(e.into()),
            _ => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(started.elapsed().as_secs_f64()),
    }
}

/// Runs a child to its end: whether it succeeded, and what it used.
pub(super) fn run_measured(command: &mut Command) -> Result<(bool, ChildRun)> {
    command.stdout(std::process::Stdio::null());
    let started = Instant::now();
    let child = command.spawn().context("starting a benchmark child")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = started.elapsed().as_secs_f64();
    if pid < 0 {
        bail!(
            "waiting for a benchmark child: {}",
            std::io::Error::last_os_error()
        );
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        ok,
        ChildRun {
            wall_s: wall,
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // ru_maxrss is in KiB on Linux.
            peak_mb: usage.ru_maxrss as f64 * 1024.0 / 1e6,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn run_together_waits_for_every_child_and_reports_a_failure() {
        let wall = run_together(vec![shell("sleep 0.2"), shell("true")]).unwrap();
        assert!(
            wall >= 0.2,
            "returned after {wall} s, before the slowest child ended"
        );
        let err = run_together(vec![shell("exit 3"), shell("true")]).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
        let missing = Command::new("/nonexistent/bertrain-bench-child");
        let err = run_together(vec![shell("sleep 5"), missing]).unwrap_err();
        assert!(format!("{err:#}").contains("starting"), "{err:#}");
    }
}
