//! Numerical parity of `BertForSequenceClassification` with Hugging Face transformers, and
//! the classifier's HF directories.
//!
//! The fixture was made once by `tests/fixtures/make_hf_classifier_fixture.py` (Python
//! 3.11.7, torch 2.15.0+cu132 from PyPI run on the CPU, transformers 5.24.0, safetensors
//! 0.8.0, in a throwaway venv): a random tiny `BertForSequenceClassification` (3 labels)
//! saved with `save_pretrained`, and its logits and loss on a fixed padded batch of sentence
//! pairs in eval mode (`hf-tiny-classifier-expected.json`).
//!
//! The other direction (a bertrain-written directory loads in transformers with no missing
//! or unexpected keys and the same logits) needs Python, so it is not a Rust test: with
//! `BERTRAIN_CLASSIFIER_EXPORT=DIR` the round-trip test below leaves its directory in DIR,
//! with bertrain's logits in `DIR/expected-logits.json`, and
//! `python tests/fixtures/make_hf_classifier_fixture.py --check DIR` checks it.

use std::path::{Path, PathBuf};

use bertrain_model::classifier::{classifier_config_json, num_labels_in};
use bertrain_model::hf::{self, load_dir, save_dir_with_config};
use bertrain_model::{
    BertConfig, BertForPreTraining, BertForSequenceClassification, ClassificationBatch,
    ParamLayout, Targets, Unpadding, flatten_params, load_flat_params,
};
use burn::backend::Flex;
use burn::prelude::*;
use serde::Deserialize;

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[derive(Deserialize)]
struct Expected {
    input_ids: Vec<Vec<i64>>,
    token_type_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    labels: Vec<i64>,
    logits: Vec<Vec<f32>>,
    loss: f32,
}

fn expected() -> Expected {
    let text =
        std::fs::read_to_string(fixtures().join("hf-tiny-classifier-expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn int2(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    let (r, c) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [r, c]), &Default::default())
}

fn batch(e: &Expected) -> (ClassificationBatch<B>, Unpadding) {
    let mask: Vec<i64> = e.attention_mask.iter().flatten().copied().collect();
    let shape = [e.input_ids.len(), e.input_ids[0].len()];
    (
        ClassificationBatch {
            input_ids: int2(&e.input_ids),
            token_type_ids: int2(&e.token_type_ids),
            attention_mask: int2(&e.attention_mask),
        },
        Unpadding::new(&mask, shape, &[]),
    )
}

/// The classifier in `dir` with `num_labels` outputs, and what the loader initialised.
fn load(
    dir: &Path,
    num_labels: usize,
    seed: u64,
) -> (BertForSequenceClassification<B>, Vec<String>) {
    let config = BertConfig::load(&dir.join(hf::CONFIG_FILE)).unwrap();
    let model = BertForSequenceClassification::<B>::new(&config, num_labels, &Default::default());
    let layout = ParamLayout::of(&model);
    let loaded = load_dir(dir, &layout, seed).unwrap();
    (
        load_flat_params(model, &loaded.flat, &layout),
        loaded.initialised,
    )
}

fn values(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn parameter_names_are_hf_sequence_classification_names() {
    let dir = fixtures().join("hf-tiny-classifier");
    let config = BertConfig::load(&dir.join(hf::CONFIG_FILE)).unwrap();
    let model = BertForSequenceClassification::<B>::new(&config, 3, &Default::default());
    let names: Vec<String> = ParamLayout::of(&model)
        .slots
        .into_iter()
        .map(|s| s.name)
        .collect();
    let bytes = std::fs::read(dir.join(hf::WEIGHTS_FILE)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut in_file: Vec<String> = file.names().into_iter().map(String::from).collect();
    let mut ours = names.clone();
    in_file.sort();
    ours.sort();
    assert_eq!(ours, in_file);
    assert!(names.contains(&"classifier.weight".to_string()));
}

#[test]
fn logits_and_loss_match_transformers_within_1e_4() {
    let e = expected();
    let dir = fixtures().join("hf-tiny-classifier");
    let num_labels = num_labels_in(&std::fs::read_to_string(dir.join("config.json")).unwrap());
    assert_eq!(num_labels, Some(3));
    let (model, initialised) = load(&dir, 3, 0);
    assert!(initialised.is_empty(), "{initialised:?}");
    let (batch, unpadding) = batch(&e);
    let want: Vec<f32> = e.logits.iter().flatten().copied().collect();
    let unpadded = values(model.forward(&batch, &unpadding));
    let padded = values(model.forward_padded(&batch));
    assert!(
        max_abs_diff(&unpadded, &want) < 1e-4,
        "{unpadded:?} vs {want:?}"
    );
    assert!(
        max_abs_diff(&padded, &want) < 1e-4,
        "{padded:?} vs {want:?}"
    );
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new(e.labels.clone(), [e.labels.len()]),
        &Default::default(),
    );
    let logits = model.forward(&batch, &unpadding);
    let loss: f32 = model.loss(logits, &Targets::Classes(labels)).into_scalar();
    assert!((loss - e.loss).abs() < 1e-4, "loss {loss} vs {}", e.loss);
}

/// Written by bertrain and read back: the same parameters and logits, and a config.json
/// that names the class and the labels as transformers reads them.
#[test]
fn a_written_directory_reads_back_with_the_same_logits() {
    let e = expected();
    let (model, _) = load(&fixtures().join("hf-tiny-classifier"), 3, 0);
    let config = BertConfig::load(&fixtures().join("hf-tiny-classifier/config.json")).unwrap();
    let layout = ParamLayout::of(&model);
    let flat = flatten_params(&model);
    let out = match std::env::var_os("BERTRAIN_CLASSIFIER_EXPORT") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("bertrain-classifier-{}", std::process::id())),
    };
    let labels: Vec<String> = ["no", "maybe", "yes"].map(String::from).to_vec();
    let json = classifier_config_json(&config, &labels, false);
    save_dir_with_config(
        &out,
        &config,
        &json,
        &layout,
        &flat,
        Some(&fixtures().join("hf-tiny-classifier/vocab.txt")),
    )
    .unwrap();
    let (batch, unpadding) = batch(&e);
    let logits = values(model.forward(&batch, &unpadding));
    let rows: Vec<Vec<f32>> = logits.chunks(3).map(<[f32]>::to_vec).collect();
    std::fs::write(
        out.join("expected-logits.json"),
        serde_json::to_string(&rows).unwrap(),
    )
    .unwrap();

    let written = std::fs::read_to_string(out.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(v["architectures"][0], "BertForSequenceClassification");
    assert_eq!(v["id2label"]["2"], "yes");
    assert_eq!(v["label2id"]["maybe"], 1);
    assert_eq!(v["problem_type"], "single_label_classification");
    let (back, initialised) = load(&out, 3, 0);
    assert!(initialised.is_empty());
    assert_eq!(flatten_params(&back), flat);
    assert_eq!(values(back.forward(&batch, &unpadding)), logits);
    if std::env::var_os("BERTRAIN_CLASSIFIER_EXPORT").is_none() {
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A pretraining checkpoint starts a classifier: its encoder and pooler are kept, its MLM
/// and NSP heads dropped, and the classifier is initialised from the seed (the same seed
/// gives the same head, another seed another one).
#[test]
fn a_pretraining_checkpoint_starts_a_classifier() {
    let dir = fixtures().join("hf-tiny-pretraining");
    let (a, initialised) = load(&dir, 2, 5);
    assert_eq!(initialised, vec!["classifier.weight", "classifier.bias"]);
    let (b, _) = load(&dir, 2, 5);
    let (c, _) = load(&dir, 2, 6);
    assert_eq!(flatten_params(&a), flatten_params(&b));
    assert_ne!(flatten_params(&a), flatten_params(&c));
    let config = BertConfig::load(&dir.join("config.json")).unwrap();
    let pretraining = BertForPreTraining::<B>::new(&config, &Default::default());
    let layout = ParamLayout::of(&pretraining);
    let pretrained = load_dir(&dir, &layout, 0).unwrap().flat;
    let encoder = |flat: &[f32], layout: &ParamLayout| -> Vec<f32> {
        layout
            .slots
            .iter()
            .filter(|s| s.name.starts_with("bert."))
            .flat_map(|s| flat[s.offset..s.offset + s.len].to_vec())
            .collect()
    };
    assert_eq!(
        encoder(&flatten_params(&a), &ParamLayout::of(&a)),
        encoder(&pretrained, &layout)
    );
    let weight = ParamLayout::of(&a)
        .get("classifier.weight")
        .unwrap()
        .clone();
    let head = &flatten_params(&a)[weight.offset..weight.offset + weight.len];
    assert!(head.iter().any(|&v| v != 0.0) && head.iter().all(|v| v.abs() <= 0.04));
}
