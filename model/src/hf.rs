//! Hugging Face directories: `config.json` + `model.safetensors` (+ `vocab.txt`), read and
//! written with `BertForPreTraining`'s parameter names, so that an exported checkpoint
//! loads with `transformers.BertForPreTraining.from_pretrained` and an HF model (with or
//! without the pretraining heads) can start a run here.

use std::collections::HashMap;
use std::fs;

use std::path::Path;

use anyhow::{Context, Result, bail};
use bertrain_files::write_atomically;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::BertConfig;
use crate::init::{SplitMix64, init_slot};
use crate::params::{ParamLayout, ParamSlot, flat_to_hf, hf_to_flat};

pub use bertrain_files::{CONFIG_FILE, TOKENIZER_CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE};

/// Weights read from a directory, in this project's flat layout.
#[derive(Debug)]
pub struct LoadedWeights {
    pub config: BertConfig,
    /// Flat parameters, laid out by `ParamLayout::of` a model built from `config`.
    pub flat: Vec<f32>,
    /// Parameters the file did not have and that were freshly initialised (the
    /// pretraining heads of a bare `BertModel`).
    pub initialised: Vec<String>,
}

/// Reads `dir/config.json` and `dir/model.safetensors` into `layout` (which must come
/// from a model built with the directory's config). Missing heads (the pretraining heads
/// `cls.*`, a classifier's `classifier.*`) are initialised from `seed` and listed in
/// `initialised`; any other missing or mis-shaped tensor is an error naming the file and
/// the key. Tensors the layout does not name (another model's heads) are ignored.
pub fn load_dir(dir: &Path, layout: &ParamLayout, seed: u64) -> Result<LoadedWeights> {
    let config = BertConfig::load(&dir.join(CONFIG_FILE))?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let names: HashMap<String, String> = tensors
        .names()
        .into_iter()
        .map(|n| (canonical_name(n), n.to_string()))
        .collect();

    let mut flat = vec![0.0f32; layout.total];
    let mut initialised = Vec::new();
    for (index, slot) in layout.slots.iter().enumerate() {
        let Some(stored) = names.get(&slot.name) else {
            if is_head(&slot.name) {
                let mut rng = SplitMix64::new(seed ^ index as u64);
                init_slot(slot, config.initializer_range as f32, &mut rng, &mut flat);
                initialised.push(slot.name.clone());
                continue;
            }
            bail!("{}: missing tensor {}", path.display(), slot.name);
        };
        let view = tensors.tensor(stored).expect("name listed by the file");
        let expected = slot.hf_shape();
        if view.shape() != expected.as_slice() {
            bail!(
                "{}: tensor {} has shape {:?}, the config needs {:?}",
                path.display(),
                stored,
                view.shape(),
                expected
            );
        }
        let values =
            to_f32(&view).with_context(|| format!("{}: tensor {}", path.display(), stored))?;
        hf_to_flat(slot, &values, &mut flat);
    }
    Ok(LoadedWeights {
        config,
        flat,
        initialised,
    })
}

/// Maps the names HF has used over the years onto the current ones: a bare `BertModel`
/// has no `bert.` prefix, and checkpoints converted from TensorFlow call LayerNorm's
/// parameters gamma and beta.
fn canonical_name(name: &str) -> String {
    let name = name
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias");
    if name.starts_with("bert.") || is_head(&name) {
        name
    } else {
        format!("bert.{name}")
    }
}

/// Parameters of a task head rather than of the encoder: what a model may lack and get
/// initialised.
fn is_head(name: &str) -> bool {
    name.starts_with("cls.") || name.starts_with("classifier.")
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not a floating-point type"),
    };
    Ok(values)
}

/// Writes parameters as an HF safetensors file (f32, HF names and shapes), to a temporary
/// name first and then renamed, so a crash never leaves a truncated file under the real
/// name.
pub fn write_safetensors(
    path: &Path,
    layout: &ParamLayout,
    flat: &[f32],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let buffers: Vec<(&ParamSlot, Vec<u8>)> = layout
        .slots
        .iter()
        .map(|slot| {
            let bytes = flat_to_hf(slot, flat)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (slot, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(slot, bytes)| {
            let view = TensorView::new(Dtype::F32, slot.hf_shape(), bytes)
                .expect("shape and byte length agree");
            (slot.name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, metadata)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomically(path, &bytes)
}

/// Writes an HF directory: `config.json`, `model.safetensors` and, if given, `vocab.txt`.
pub fn save_dir(
    dir: &Path,
    config: &BertConfig,
    layout: &ParamLayout,
    flat: &[f32],
    vocab: Option<&Path>,
) -> Result<()> {
    save_dir_with_config(dir, config, &config.to_hf_json(), layout, flat, vocab)
}

/// [`save_dir`] with the `config.json` text given: a classifier's config says more than
/// the encoder's shape (see `classifier::classifier_config_json`).
pub fn save_dir_with_config(
    dir: &Path,
    config: &BertConfig,
    config_json: &str,
    layout: &ParamLayout,
    flat: &[f32],
    vocab: Option<&Path>,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&dir.join(CONFIG_FILE), config_json.as_bytes())?;
    // HF's format metadata: transformers warns about files without it.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), layout, flat, Some(metadata))?;
    if let Some(vocab) = vocab {
        check_vocab(vocab, config)?;
        let text = fs::read(vocab).with_context(|| format!("cannot read {}", vocab.display()))?;
        write_atomically(&dir.join(VOCAB_FILE), &text)?;
    }
    Ok(())
}

/// Refuses a vocabulary whose size disagrees with the model's embedding table.
pub fn check_vocab(vocab: &Path, config: &BertConfig) -> Result<()> {
    let text = fs::read_to_string(vocab)
        .with_context(|| format!("cannot read vocabulary {}", vocab.display()))?;
    let size = text.lines().count();
    if size != config.vocab_size {
        bail!(
            "{}: {size} tokens, but the model's vocab_size is {}; use the vocabulary the model \
             was trained with",
            vocab.display(),
            config.vocab_size
        );
    }
    Ok(())
}
