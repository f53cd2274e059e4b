//! `bench checkpoint`: the training stall of a checkpoint and its background write.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bertrain_model::BertConfig;

pub(super) fn bench_checkpoint(presets: &str, dir: &Path) -> Result<()> {
    use bertrain_coordinator::checkpoints::{TRAINER_FORMAT_VERSION, TrainerState};
    use bertrain_model::{BertForPreTraining, ParamLayout};
    use bertrain_worker::OptimizerState;
    use bertrain_worker::{PendingWrite, Snapshot};
    if dir.exists() {
        bail!(
            "{} exists; choose another --dir (the benchmark removes it when done)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let vocab = dir.join("vocab.txt");
    println!(
        "{:<8} {:>12} {:>10} {:>14} {:>14} {:>14}",
        "model", "parameters", "MB", "stall ms 1st", "stall ms next", "write s (bg)"
    );
    let result = (|| -> Result<()> {
        for preset in presets.split(',').map(str::trim) {
            let config = BertConfig::preset(preset)?;
            std::fs::write(
                &vocab,
                (0..config.vocab_size)
                    .map(|i| format!("t{i}\n"))
                    .collect::<String>(),
            )?;
            let layout = ParamLayout::of(&BertForPreTraining::<burn::backend::Flex>::new(
                &config,
                &Default::default(),
            ));
            let params = vec![0.5f32; layout.total];
            let optimizer = OptimizerState {
                step: 1,
                exp_avg: vec![0.1; layout.total],
                exp_avg_sq: vec![0.01; layout.total],
            };
            // What the training thread does: copy the state off; the first checkpoint into
            // fresh buffers, later ones into the previous checkpoint's (Snapshot::refill).
            let started = Instant::now();
            let snapshot = Snapshot {
                config: config.clone(),
                layout: layout.clone(),
                params: params.clone(),
                optimizer: optimizer.clone(),
                trainer: TrainerState {
                    format_version: TRAINER_FORMAT_VERSION,
                    step: 1,
                    epoch: 0,
                    samples_consumed: 256,
                    global_batch_size: 256,
                    lr: 1e-4,
                    seed: 0,
                    world_size: 1,
                    job_hash: String::new(),
                    dataset_hash: String::new(),
                },
                vocab: vocab.clone(),
                tokenizer_config: bertrain_dataprep::Casing {
                    lowercase: true,
                    source: bertrain_dataprep::CasingSource::Trained,
                }
                .tokenizer_config_json(),
            };
            let first_stall = started.elapsed().as_secs_f64();
            let checkpoints = dir.join(preset);
            std::fs::create_dir_all(&checkpoints)?;
            let mut written = PendingWrite::start(checkpoints.clone(), snapshot).finish();
            written.result?;
            let mut snapshot = written
                .snapshot
                .take()
                .context("the writer kept the snapshot")?;
            let started = Instant::now();
            snapshot.refill(&params, &optimizer);
            snapshot.trainer.step = 2;
            let stall = started.elapsed().as_secs_f64();
            let written = PendingWrite::start(checkpoints, snapshot).finish();
            written.result?;
            let mb = (3 * layout.total * 4) as f64 / 1e6;
            println!(
                "{preset:<8} {:>12} {mb:>10.0} {:>14.0} {:>14.0} {:>14.2}",
                layout.total,
                first_stall * 1e3,
                stall * 1e3,
                written.seconds
            );
        }
        Ok(())
    })();
    std::fs::remove_dir_all(dir).ok();
    result
}
