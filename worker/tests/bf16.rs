//! bf16 compute with fp32 master weights (`train.precision = "bf16"`) on the CPU backend.
//!
//! A device's default float type can be set only once per process, before its first
//! tensor, so this file is a test binary of its own: every test in it sees a bf16 device.

use bertrain_coordinator::job::Precision;
use bertrain_dataprep::Instance;
use bertrain_model::{BertConfig, flatten_params, init_bert};
use bertrain_worker::batch::HostBatch;
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::optim::{OptimizerConfig, OptimizerKind};
use bertrain_worker::trainer::Trainer;
use bertrain_worker::{CpuBackend, set_precision};

fn config() -> BertConfig {
    BertConfig {
        vocab_size: 120,
        ..BertConfig::preset("tiny").unwrap()
    }
}

fn batch(seed: u64) -> HostBatch {
    let instances: Vec<Instance> = (0..8u64)
        .map(|row| {
            let len = 16 + row as usize;
            let input_ids: Vec<u32> = (0..len as u64)
                .map(|i| 5 + ((seed * 31 + row * 17 + i * 7) % 110) as u32)
                .collect();
            let masked_lm_positions = vec![1, 4, (len - 2) as u32];
            Instance {
                token_type_ids: (0..len).map(|i| u8::from(i >= len / 2)).collect(),
                masked_lm_ids: masked_lm_positions
                    .iter()
                    .map(|&p| input_ids[p as usize])
                    .collect(),
                input_ids,
                masked_lm_positions,
                next_sentence_label: ((seed + row) % 2) as u8,
            }
        })
        .collect();
    HostBatch::collate(&instances)
}

fn bf16(x: f32) -> f32 {
    burn::tensor::bf16::from_f32(x).to_f32()
}

/// The model computes in bf16 from f32 master parameters, and learns: after every step the
/// model holds exactly the bf16 rounding of the master copy, while the master copy keeps
/// updates finer than bf16 can hold (almost none of its values are bf16 numbers).
#[test]
fn bf16_model_trains_from_f32_master_parameters() {
    let device = Default::default();
    set_precision::<CpuBackend>(&device, Precision::Bf16).unwrap();
    // A second generation in the same process sets the same precision again.
    set_precision::<CpuBackend>(&device, Precision::Bf16).unwrap();
    let error = set_precision::<CpuBackend>(&device, Precision::Fp32).unwrap_err();
    assert!(format!("{error}").contains("train.precision"), "{error}");

    let model = init_bert::<CpuBackend>(&config(), 7, &device);
    let mut trainer = Trainer::new(
        model,
        OptimizerConfig::bert(OptimizerKind::AdamW, 0.01),
        1.0,
        0,
        device,
    );
    let batch = batch(0);
    let mut losses = Vec::new();
    for step in 0..20 {
        let stats = trainer
            .step(
                step,
                0,
                std::slice::from_ref(&batch),
                1e-3,
                false,
                &mut LocalCollective,
            )
            .unwrap();
        losses.push(stats.loss);
    }
    // Losses are computed in f32. In bf16 the first step's MLM loss (about 4.8) and NSP
    // loss (about 0.7) would be multiples of 2^-5 and 2^-8, and so would their sum.
    assert_ne!(
        (losses[0] * 256.0).fract(),
        0.0,
        "the loss looks computed in bf16: {}",
        losses[0]
    );
    assert!(
        losses[19] < losses[0] * 0.5,
        "the loss did not fall: {losses:?}"
    );

    let in_model = flatten_params(&trainer.model);
    let rounded: Vec<f32> = trainer.params.iter().map(|&x| bf16(x)).collect();
    assert_eq!(in_model, rounded, "the model holds bf16(master)");
    let representable = trainer.params.iter().filter(|&&x| bf16(x) == x).count();
    assert!(
        representable * 100 < trainer.params.len(),
        "{representable} of {} master parameters are bf16 numbers: the master copy lost its precision",
        trainer.params.len()
    );
}
