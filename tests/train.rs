//! Multi-process data-parallel training, end to end: `bertrain launch` starts a real
//! coordinator and real worker processes that talk over loopback TCP.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn launch(job: &Path, run_dir: &Path, sets: &[&str]) {
    let mut c = bertrain();
    c.arg("launch")
        .arg("--config")
        .arg(job)
        .arg("--set")
        .arg(format!("job.run_dir={}", run_dir.display()));
    for s in sets {
        c.arg("--set").arg(s);
    }
    let out = run_bounded(c, Duration::from_secs(300));
    ok(&out);
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// 2 workers x micro-batch 8 == 1 worker x micro-batch 16 == 1 worker x 2 micro-batches
/// of 8 (gradient accumulation): the same samples per step, the same mean gradient, so
/// the same parameters up to float rounding of the summation order.
#[test]
fn data_parallel_equals_one_worker_and_gradient_accumulation() {
    let data = dataset();
    let tmp = TempDir::new("equivalence");
    let job = write_job(tmp.path(), data, 0.0);
    let runs = [
        ("two-workers", vec![]),
        (
            "one-worker-big-batch",
            vec!["cluster.world_size=1", "train.micro_batch_size=16"],
        ),
        ("one-worker-accumulation", vec!["cluster.world_size=1"]),
    ];
    let mut weights = Vec::new();
    for (name, sets) in &runs {
        let run_dir = tmp.path().join(name);
        launch(&job, &run_dir, sets);
        let m = metrics(&run_dir);
        let steps: Vec<u64> = m
            .iter()
            .filter(|v| v.get("split").is_none())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=6).collect::<Vec<_>>(),
            "{name}: one metrics line per step"
        );
        let evals = m.iter().filter(|v| v["split"] == "validation").count();
        assert_eq!(evals, 2, "{name}: evaluations at steps 3 and 6");
        weights.push(final_weights(&run_dir));
    }
    let initial_scale = weights[0]
        .iter()
        .flat_map(|(_, v)| v)
        .fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(initial_scale > 0.01, "weights look empty");
    for i in 1..weights.len() {
        let d = max_abs_diff(&weights[0], &weights[i]);
        assert!(d < 1e-4, "{} differs from {} by {d}", runs[i].0, runs[0].0);
    }
}

/// Same job, same world size: bit-identical parameters (determinism is a feature).
#[test]
fn a_run_repeats_bit_for_bit() {
    let data = dataset();
    let tmp = TempDir::new("repeat");
    let job = write_job(tmp.path(), data, 0.0);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    launch(&job, &a, &["train.max_steps=3"]);
    launch(&job, &b, &["train.max_steps=3"]);
    assert_eq!(final_weights(&a), final_weights(&b));
}

/// The demo (README's first command) end to end, cut to half its steps: the tiny BERT's
/// masked-LM accuracy starts at chance (1 in ~6,500 tokens) and is far above it on the
/// validation split by the end.
///
/// NSP accuracy is not asserted: within the demo's steps it stays near the share of the
/// majority class (about 0.58 NotNext), which is still an open problem (issue 4).
#[test]
fn the_demo_learns_masked_lm_within_its_steps() {
    let dir = std::env::temp_dir().join(format!("bertrain-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = bertrain();
    c.arg("demo")
        .arg("--run-dir")
        .arg(&dir)
        .args(["--set", "train.max_steps=150"]);
    let out = run_bounded(c, Duration::from_secs(600));
    ok(&out);
    let records = metrics(&dir.join("run"));
    let first = &records[0];
    assert_eq!(first["step"], 1);
    let validation = records
        .iter()
        .rev()
        .find(|r| r.get("split").is_some())
        .expect("a validation record");
    let (start, end) = (
        first["mlm_accuracy"].as_f64().unwrap(),
        validation["mlm_accuracy"].as_f64().unwrap(),
    );
    assert!(
        start < 0.02 && end > 0.05,
        "MLM accuracy {start} at step 1, {end} on validation at the end"
    );
    assert!(dir.join("model/model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
