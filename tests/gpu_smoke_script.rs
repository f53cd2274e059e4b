//! `scripts/gpu-smoke.sh` is meant for a machine with a GPU, which CI does not have. Its
//! logic (data, job file, launch, parsing the throughput line and the losses, the verdict)
//! is the same on the CPU backend, so this runs it there on the tiny model.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn smoke(precision: &str) -> std::process::Output {
    let mut c = Command::new("bash");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-smoke.sh"))
        .arg(env!("CARGO_BIN_EXE_bertrain"))
        .env("BACKEND", "cpu")
        .env("MODELS", "tiny")
        .env("STEPS", "20")
        .env("PRECISION", precision);
    run_bounded(c, Duration::from_secs(300))
}

#[test]
fn gpu_smoke_script_runs_on_the_cpu_backend() {
    let out = smoke("fp32");
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("tiny "))
        .unwrap_or_else(|| panic!("no result row for tiny:\n{stdout}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    // model, tokens/s, MFU (none on the CPU), first loss, last loss, result
    assert!(fields[1].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(fields[2], "-", "{row}");
    let (first, last): (f64, f64) = (fields[3].parse().unwrap(), fields[4].parse().unwrap());
    assert!(last < first, "{row}");
    assert_eq!(fields[5], "ok", "{row}");

    // A job that cannot run (bf16 needs the cuda backend) fails the script.
    let out = smoke("bf16");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("job failed"),
        "{}",
        describe(&out)
    );
}
