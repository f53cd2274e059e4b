//! `bertrain bench`: performance figures as tables (never timed tests).
//!
//! `bench train` measures one full training step (forward + backward + all-reduce +
//! AdamW) in tokens/s at sequence length 128, beside the figures of HF transformers
//! `BertForPreTraining` on torch 2.15 measured on the same 2-core machine (fp32, 2
//! threads, batch 32, or 8 for base, seq 128, AdamW).

use std::time::Instant;

use anyhow::{Result, bail};
use bertrain_dataprep::Instance;
use bertrain_model::init::SplitMix64;
use bertrain_model::{BertConfig, init_bert};
use bertrain_worker::CpuBackend;
use bertrain_worker::batch::HostBatch;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::optim::{OptimizerConfig, OptimizerKind};
use bertrain_worker::trainer::Trainer;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(clap::Subcommand)]
enum BenchKind {
    /// Training-step throughput of model presets on the CPU.
    Train {
        /// Comma-separated presets.
        #[arg(long, default_value = "tiny,mini,base")]
        presets: String,
        /// Measured steps per preset (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

/// (preset, batch size, HF transformers tokens/s on this machine).
const REFERENCE: &[(&str, usize, f64)] = &[("tiny", 32, 3262.0), ("mini", 32, 1949.0), ("base", 8, 284.0)];

const SEQ_LEN: usize = 128;
const PREDICTIONS: usize = 20;

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchKind::Train { presets, steps } => bench_train(&presets, steps),
    }
}

fn bench_train(presets: &str, steps: usize) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    println!("training step, seq {SEQ_LEN}, {PREDICTIONS} predictions/seq, AdamW, fp32, CPU (Flex)");
    println!(
        "{:<8} {:>6} {:>10} {:>12} {:>14} {:>10}",
        "model", "batch", "s/step", "tokens/s", "HF torch tok/s", "ratio"
    );
    for preset in presets.split(',').map(str::trim) {
        let config = BertConfig::preset(preset)?;
        let (batch_size, reference) = REFERENCE
            .iter()
            .find(|r| r.0 == preset)
            .map(|r| (r.1, Some(r.2)))
            .unwrap_or((32, None));
        let device = Default::default();
        let model = init_bert::<CpuBackend>(&config, 0, &device);
        let optimizer = OptimizerConfig::bert(OptimizerKind::AdamW, 0.01);
        let mut trainer = Trainer::new(model, optimizer, 1.0, 0, device);
        let batch = random_batch(&config, batch_size, 1);
        let mut collective = LocalCollective;
        trainer.step(0, 0, std::slice::from_ref(&batch), 1e-4, &mut collective)?;
        let started = Instant::now();
        for step in 1..=steps as u64 {
            trainer.step(step, 0, std::slice::from_ref(&batch), 1e-4, &mut collective)?;
        }
        let per_step = started.elapsed().as_secs_f64() / steps as f64;
        let tokens_per_s = (batch_size * SEQ_LEN) as f64 / per_step;
        let (reference, ratio) = match reference {
            Some(r) => (format!("{r:.0}"), format!("{:.2}x", tokens_per_s / r)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{preset:<8} {batch_size:>6} {per_step:>10.3} {tokens_per_s:>12.0} {reference:>14} {ratio:>10}"
        );
    }
    Ok(())
}

/// Full-length instances of random tokens with `PREDICTIONS` masked positions each.
pub fn random_batch(config: &BertConfig, rows: usize, seed: u64) -> HostBatch {
    let mut rng = SplitMix64::new(seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as u32;
    let instances: Vec<Instance> = (0..rows)
        .map(|_| {
            let input_ids: Vec<u32> = (0..SEQ_LEN).map(|_| 999 + below(config.vocab_size - 999)).collect();
            let token_type_ids = (0..SEQ_LEN).map(|i| u8::from(i >= SEQ_LEN / 2)).collect();
            let masked_lm_positions: Vec<u32> = (0..PREDICTIONS).map(|k| 1 + (k * 6) as u32).collect();
            let masked_lm_ids = masked_lm_positions.iter().map(|&p| input_ids[p as usize]).collect();
            Instance {
                input_ids,
                token_type_ids,
                masked_lm_positions,
                masked_lm_ids,
                next_sentence_label: below(2) as u8,
            }
        })
        .collect();
    HostBatch::collate(&instances)
}
