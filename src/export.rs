//! `bertrain export`: a checkpoint -> a Hugging Face directory (`config.json`,
//! `model.safetensors`, `vocab.txt`, `tokenizer_config.json`) that
//! `transformers.BertForPreTraining.from_pretrained` loads with no missing keys.

use std::path::PathBuf;

use anyhow::{Result, bail};
use bertrain_coordinator::checkpoints;
use bertrain_model::{BertConfig, BertForPreTraining, ParamLayout, hf};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A checkpoint directory (`step-N`), or a run or checkpoints directory (its `latest`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The HF directory to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace files already in OUTPUT.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dir = checkpoints::resolve(&args.checkpoint)?;
    let state = checkpoints::verify(&dir)?;
    let config = BertConfig::load(&dir.join(hf::CONFIG_FILE))?;
    let vocab = dir.join(hf::VOCAB_FILE);
    hf::check_vocab(&vocab, &config)?;
    let occupied =
        args.output.join(hf::WEIGHTS_FILE).exists() || args.output.join(hf::CONFIG_FILE).exists();
    if occupied && !args.overwrite {
        bail!(
            "{} already holds a model; pass --overwrite to replace it or choose another --output",
            args.output.display()
        );
    }
    // Read the weights through the model's layout and write them anew: the export is
    // checked tensor by tensor, not just copied.
    let layout = ParamLayout::of(&BertForPreTraining::<burn::backend::Flex>::new(
        &config,
        &Default::default(),
    ));
    let weights = hf::load_dir(&dir, &layout, 0)?;
    hf::save_dir(&args.output, &config, &layout, &weights.flat, Some(&vocab))?;
    // The casing as every other command decides it (the checkpoint's tokenizer_config.json,
    // or an inference for checkpoints without one), written out so HF tools use it too.
    let casing = bertrain_dataprep::Vocab::load(&vocab, None)?.casing;
    bertrain_files::write_atomically(
        &args.output.join(hf::TOKENIZER_CONFIG_FILE),
        casing.tokenizer_config_json().as_bytes(),
    )?;
    println!(
        "exported step {} ({:.1}M parameters) from {} to {}",
        state.step,
        config.num_parameters() as f64 / 1e6,
        dir.display(),
        args.output.display()
    );
    println!(
        "load it with transformers.BertForPreTraining.from_pretrained({:?})",
        args.output.display().to_string()
    );
    Ok(())
}
