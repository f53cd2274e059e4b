//! `bertrain inspect`: decode a few instances and print shard and dataset statistics.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde_json::json;

use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::shards::{Instance, read_rows, row_group_rows};
use crate::vocab::Vocab;

/// Statistics of one shard, from reading all of its rows.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ShardStats {
    pub rows: u64,
    pub row_groups: usize,
    pub tokens: u64,
    pub max_len: usize,
    pub masked: u64,
    pub masked_as_mask: u64,
    pub masked_kept: u64,
    pub masked_random: u64,
    pub not_next: u64,
    /// Tokens that were `[UNK]` before masking (counted when the vocabulary is known).
    pub unk: u64,
}

/// Statistics of `shard`; `vocab` gives the ids of `[MASK]` and `[UNK]` when known.
pub fn shard_stats(shard: &Path, vocab: Option<&Vocab>) -> Result<ShardStats> {
    let mask_id = vocab.map(|v| v.mask);
    let unk_id = vocab.map(|v| v.unk);
    let groups = row_group_rows(shard)?;
    let total: u64 = groups.iter().sum();
    let mut s = ShardStats {
        row_groups: groups.len(),
        ..Default::default()
    };
    for row in read_rows(shard, 0, total)? {
        let r = row?;
        s.rows += 1;
        s.tokens += r.input_ids.len() as u64;
        s.max_len = s.max_len.max(r.input_ids.len());
        s.not_next += u64::from(r.next_sentence_label);
        if let Some(unk) = unk_id {
            // The text's own token at each position: the original where it was masked.
            let shown_unk = r.input_ids.iter().filter(|&&t| t == unk).count() as u64;
            let masked_shown_unk = r
                .masked_lm_positions
                .iter()
                .filter(|&&p| r.input_ids.get(p as usize) == Some(&unk))
                .count() as u64;
            let masked_orig_unk = r.masked_lm_ids.iter().filter(|&&t| t == unk).count() as u64;
            s.unk += shown_unk - masked_shown_unk + masked_orig_unk;
        }
        for (&p, &orig) in r.masked_lm_positions.iter().zip(&r.masked_lm_ids) {
            s.masked += 1;
            let shown = r.input_ids.get(p as usize).copied();
            if shown == mask_id && mask_id.is_some() {
                s.masked_as_mask += 1;
            } else if shown == Some(orig) {
                s.masked_kept += 1;
            } else {
                s.masked_random += 1;
            }
        }
    }
    Ok(s)
}

/// Locates the shard, manifest and vocabulary for a path that is a dataset directory, a
/// manifest file or a shard file.
fn locate(path: &Path) -> Result<(PathBuf, Option<Manifest>)> {
    if path.is_dir() || path.file_name().is_some_and(|n| n == MANIFEST_FILE) {
        let m = Manifest::load(path)?;
        let Some(first) = m.shards.first() else {
            bail!(
                "dataset {} has no shards (it holds no instances)",
                m.dir().display()
            );
        };
        return Ok((m.shard_path(first), Some(m)));
    }
    if !path.exists() {
        bail!(
            "{} does not exist; pass a dataset directory, its manifest.json or a shard .parquet file",
            path.display()
        );
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let manifest = if dir.join(MANIFEST_FILE).is_file() {
        Some(Manifest::load(dir)?)
    } else {
        None
    };
    Ok((path.to_path_buf(), manifest))
}

fn render(inst: &Instance, vocab: Option<&Vocab>) -> String {
    let tok = |id: u32| match vocab {
        Some(v) => v.token(id).to_string(),
        None => id.to_string(),
    };
    let mut out = Vec::with_capacity(inst.input_ids.len());
    let mut m = 0;
    for (i, &id) in inst.input_ids.iter().enumerate() {
        if inst.masked_lm_positions.get(m) == Some(&(i as u32)) {
            out.push(format!("[{}→{}]", tok(id), tok(inst.masked_lm_ids[m])));
            m += 1;
        } else {
            out.push(tok(id));
        }
    }
    out.join(" ")
}

pub fn run(path: &Path, rows: usize, as_json: bool, vocab_override: Option<&Path>) -> Result<()> {
    let (shard, manifest) = locate(path)?;
    let vocab_path = vocab_override
        .map(Path::to_path_buf)
        .or_else(|| manifest.as_ref().map(|m| m.dir().join(&m.vocab_file)));
    let vocab = match vocab_path {
        Some(p) if p.is_file() => Some(Vocab::load(&p, None)?),
        Some(p) if vocab_override.is_some() => {
            bail!("vocabulary {} does not exist", p.display())
        }
        _ => None,
    };
    let groups = row_group_rows(&shard)?;
    let total: u64 = groups.iter().sum();
    let shown: Vec<Instance> =
        read_rows(&shard, 0, (rows as u64).min(total))?.collect::<Result<_>>()?;
    let stats = shard_stats(&shard, vocab.as_ref())?;
    if as_json {
        let rows_json: Vec<_> = shown
            .iter()
            .map(|r| {
                json!({
                    "input_ids": r.input_ids,
                    "tokens": vocab.as_ref().map(|v| r.input_ids.iter().map(|&i| v.token(i)).collect::<Vec<_>>()),
                    "token_type_ids": r.token_type_ids,
                    "masked_lm_positions": r.masked_lm_positions,
                    "masked_lm_ids": r.masked_lm_ids,
                    "masked_lm_tokens": vocab.as_ref().map(|v| r.masked_lm_ids.iter().map(|&i| v.token(i)).collect::<Vec<_>>()),
                    "next_sentence_label": r.next_sentence_label,
                })
            })
            .collect();
        let out = json!({
            "shard": shard.display().to_string(),
            "rows": rows_json,
            "shard_stats": stats,
            "dataset": manifest.as_ref().map(|m| json!({
                "dir": m.dir().display().to_string(),
                "split": m.split,
                "shards": m.shards.len(),
                "rows": m.total_rows(),
                "tokens": m.total_tokens(),
                "vocab_size": m.vocab_size,
                "max_seq_len": m.max_seq_len,
                "max_predictions": m.max_predictions,
                "content_hash": m.content_hash(),
                "totals": m.totals,
                "unk_share": m.totals.unk_share(),
                "options": m.options,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("shard {}", shard.display());
    if vocab.is_none() {
        println!("(no vocabulary found next to the dataset; showing ids; pass --vocab to decode)");
    }
    for (i, r) in shown.iter().enumerate() {
        println!(
            "\nrow {i}: {} tokens, {} masked, {}",
            r.input_ids.len(),
            r.masked_lm_positions.len(),
            if r.next_sentence_label == 0 {
                "IsNext"
            } else {
                "NotNext"
            }
        );
        println!("  {}", render(r, vocab.as_ref()));
    }
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    println!("\nshard statistics");
    println!("  rows                 {}", stats.rows);
    println!("  row groups           {}", stats.row_groups);
    println!(
        "  tokens               {} (mean length {:.1}, max {})",
        stats.tokens,
        stats.tokens as f64 / stats.rows.max(1) as f64,
        stats.max_len
    );
    println!(
        "  masked               {} ({:.1}% of tokens, {:.1} per row)",
        stats.masked,
        pct(stats.masked, stats.tokens),
        stats.masked as f64 / stats.rows.max(1) as f64
    );
    if vocab.is_some() {
        println!(
            "  masked as [MASK]     {:.1}%, random {:.1}%, kept {:.1}%",
            pct(stats.masked_as_mask, stats.masked),
            pct(stats.masked_random, stats.masked),
            pct(stats.masked_kept, stats.masked)
        );
    }
    println!(
        "  NotNext              {:.1}%",
        pct(stats.not_next, stats.rows)
    );
    if vocab.is_some() {
        println!(
            "  [UNK]                {:.3}% of tokens",
            pct(stats.unk, stats.tokens)
        );
    }
    if let Some(m) = &manifest {
        println!("\ndataset {} ({} split)", m.dir().display(), m.split);
        println!("  shards               {}", m.shards.len());
        println!("  rows                 {}", m.total_rows());
        println!("  tokens               {}", m.total_tokens());
        println!("  documents            {}", m.totals.documents);
        if m.totals.text_tokens > 0 {
            println!(
                "  [UNK]                {:.3}% of the text's {} tokens",
                100.0 * m.totals.unk_share(),
                m.totals.text_tokens
            );
        }
        if !m.options.casing.is_empty() {
            println!("  casing               {}", m.options.casing);
        }
        println!(
            "  vocab                {} tokens, sha256 {}",
            m.vocab_size,
            &m.vocab_sha256[..m.vocab_sha256.len().min(16)]
        );
        println!(
            "  max_seq_len          {} (max_predictions {})",
            m.max_seq_len, m.max_predictions
        );
        println!("  content hash         {}", m.content_hash());
        if let Some(v) = &m.validation_manifest {
            println!("  validation manifest  {v}");
        }
    }
    Ok(())
}
