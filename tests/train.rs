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

/// How much better (absolute validation accuracy) the demo's region classifier must be
/// when fine-tuned from the pretrained model than from random weights.
const FINETUNE_MARGIN: f64 = 0.1;

/// The demo (README's first command) end to end, all its steps (about 7 minutes): the tiny
/// BERT's masked-LM accuracy starts at chance (1 in ~6,800 tokens) and is far above it on
/// the validation split by the end; its NSP accuracy on the validation split starts at the
/// share of the majority class (about 0.58 NotNext) and ends well above it. Every run gives
/// the same figures (vocabulary, shards and training are deterministic): MLM 0.212, NSP
/// 0.58 at step 200 and 0.91 at step 1,000.
///
/// It then fine-tunes: see [`FINETUNE_MARGIN`].
#[test]
fn the_demo_learns_masked_lm_and_next_sentence_within_its_steps() {
    let dir = std::env::temp_dir().join(format!("bertrain-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = bertrain();
    c.arg("demo").arg("--run-dir").arg(&dir);
    let out = run_bounded(c, Duration::from_secs(1500));
    ok(&out);
    let records = metrics(&dir.join("run"));
    let first = &records[0];
    assert_eq!(first["step"], 1);
    let validations: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.get("split").is_some())
        .collect();
    assert!(validations.len() >= 2, "validation at several steps");
    let accuracy = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap();
    let last = validations[validations.len() - 1];
    let (mlm_start, mlm_end) = (
        accuracy(first, "mlm_accuracy"),
        accuracy(last, "mlm_accuracy"),
    );
    assert!(
        mlm_start < 0.02 && mlm_end > 0.1,
        "MLM accuracy {mlm_start} at step 1, {mlm_end} on validation at the end"
    );
    let (nsp_first, nsp_end) = (
        accuracy(validations[0], "nsp_accuracy"),
        accuracy(last, "nsp_accuracy"),
    );
    assert!(
        nsp_end > 0.7 && nsp_end > nsp_first + 0.1,
        "validation NSP accuracy {nsp_first} at the first evaluation, {nsp_end} at the end"
    );
    assert!(dir.join("model/model.safetensors").exists());

    // The demo's last stage fine-tunes the exported model on "which of the 12 regions does
    // this sentence come from" and the same model from random weights on the same data,
    // steps and seed: pretraining must be worth a clear margin in validation accuracy.
    let finetuned = |name: &str| -> f64 {
        let path = dir.join("finetune").join(name).join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["final"], true, "{}", path.display());
        assert_eq!(last["metric"], "accuracy");
        last["value"].as_f64().unwrap()
    };
    let (pretrained, scratch) = (finetuned("pretrained"), finetuned("scratch"));
    assert!(
        pretrained > scratch + FINETUNE_MARGIN && pretrained > 0.5,
        "region accuracy {pretrained} fine-tuned from the pretrained model, {scratch} from random weights"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
