//! `bertrain model-info`: what a config costs before one trains it.

use anyhow::Result;
use bertrain_model::BertConfig;

#[derive(clap::Args)]
pub struct ModelInfoArgs {
    /// A preset (tiny, mini, small, medium, base, large) or a config.json file.
    #[arg(long)]
    config: String,
    /// Sequence length for the FLOPs figure.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Masked-LM predictions per sequence (the MLM head runs at these positions only).
    #[arg(long, default_value_t = 20)]
    max_predictions: usize,
}

pub fn run(args: ModelInfoArgs) -> Result<()> {
    let config = BertConfig::from_name_or_file(&args.config)?;
    let params = config.num_parameters();
    let flops = config.train_flops_per_token(args.seq_len, args.max_predictions);
    println!("model            {}", args.config);
    println!(
        "shape            {} layers, hidden {}, {} heads, feed-forward {}, vocab {}",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size
    );
    println!("parameters       {params} ({:.1}M)", params as f64 / 1e6);
    println!(
        "training FLOPs   {:.3} GFLOP per token at sequence length {} with {} predictions \
         (forward + backward)",
        flops / 1e9,
        args.seq_len,
        args.max_predictions
    );
    Ok(())
}
