//! bf16 compute with fp32 master weights (`train.precision = "bf16"`) on the CPU backend.
//!
//! A device's default float type can be set only once per process, before its first
//! tensor, so this file is a test binary of its own: every test in it sees a bf16 device.

use bertrain_coordinator::job::Precision;
use bertrain_dataprep::Instance;
use bertrain_model::{BertConfig, flatten_params, init_bert};
use bertrain_worker::collective::LocalCollective;
use bertrain_worker::{CpuBackend, HostBatch, Optimizer, OptimizerConfig, Trainer, set_precision};

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
/// updates finer than bf16 can hold (almost none of its values are bf16 numbers). Both
/// with the master copy on the host and kept on the device (the GPU path).
#[test]
fn bf16_model_trains_from_f32_master_parameters() {
    let device = Default::default();
    set_precision::<CpuBackend>(&device, Precision::Bf16).unwrap();
    // A second generation in the same process sets the same precision again.
    set_precision::<CpuBackend>(&device, Precision::Bf16).unwrap();
    let error = set_precision::<CpuBackend>(&device, Precision::Fp32).unwrap_err();
    assert!(format!("{error}").contains("train.precision"), "{error}");
    for on_device in [false, true] {
        train_and_check(on_device);
    }
}

fn train_and_check(on_device: bool) {
    let device = Default::default();
    let model = init_bert::<CpuBackend>(&config(), 7, &device);
    let mut trainer = Trainer::new(
        model,
        OptimizerConfig::bert(Optimizer::Adamw, 0.01),
        1.0,
        0,
        device,
    );
    if on_device {
        trainer.keep_on_device().unwrap();
    }
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

    trainer.sync_host();
    let in_model = flatten_params(&trainer.model);
    // Each model value is a bf16 number within one bf16 step (2^-7, relative) of the master
    // value: its rounding. Not always the nearest one: burn's CPU cast (used by the device
    // path) goes through f64, and `bf16::from_f64` rounds a few values (13 of 511,610 here)
    // the other way from `bf16::from_f32`.
    for (i, (&m, &p)) in in_model.iter().zip(&trainer.params).enumerate() {
        assert_eq!(
            bf16(m),
            m,
            "parameter {i}: {m} in the model is not a bf16 number"
        );
        assert!(
            (m - p).abs() <= p.abs() * 2f32.powi(-7),
            "parameter {i}: model {m} is not master {p} rounded to bf16"
        );
    }
    let nearest = in_model
        .iter()
        .zip(&trainer.params)
        .filter(|&(&m, &p)| m == bf16(p))
        .count();
    assert!(
        nearest * 1000 > in_model.len() * 999,
        "{nearest} of {} round to nearest",
        in_model.len()
    );
    let representable = trainer.params.iter().filter(|&&x| bf16(x) == x).count();
    assert!(
        representable * 100 < trainer.params.len(),
        "{representable} of {} master parameters are bf16 numbers: the master copy lost its precision",
        trainer.params.len()
    );
}
