//! Durable files: the one place where bertrain writes a file that must survive a crash
//! whole or not at all, and the digests that check files later.
//!
//! Every write is: a temporary sibling (`.NAME.tmp`, hidden and recognisably ours), written
//! and fsynced, renamed over the target, and the directory fsynced, so the rename itself
//! survives a power loss. Errors name the file.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// The files of a Hugging Face model directory, which checkpoints, exports and datasets
/// (the vocabulary and its casing) share.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const VOCAB_FILE: &str = "vocab.txt";
/// HF's tokenizer settings (`do_lower_case`); dataprep writes it beside the vocabulary.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// `dir/.NAME.tmp` for `dir/NAME`: where [`write_atomically`] writes before it renames
/// (dataprep removes such leftovers of an interrupted run).
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Creates or replaces `path` with `bytes` and fsyncs it: for a file inside a directory
/// that is itself renamed into place once complete (a checkpoint).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Writes `bytes` to `path` through [`temp_name`]: write, fsync, rename, fsync the
/// directory. Readers see the old file or the whole new one, never a part; nothing is left
/// behind when it fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    let result = write_synced(&tmp, bytes).and_then(|()| {
        fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent(path))
}

/// fsync of a directory, so that renames and new entries in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d =
        fs::File::open(dir).with_context(|| format!("cannot open directory {}", dir.display()))?;
    d.sync_all()
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// The directory `path` is in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// SHA-256 (hex) and length of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex(&h.finalize()), len))
}

/// Lowercase hexadecimal of `bytes` (how digests are written everywhere in bertrain).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_nothing_else() {
        let dir = std::env::temp_dir().join(format!("bertrain-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latest");
        write_atomically(&path, b"step-1").unwrap();
        write_atomically(&path, b"step-2").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"step-2");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        let (digest, len) = sha256_file(&path).unwrap();
        assert_eq!(len, 6);
        assert_eq!(digest.len(), 64);
        // Into a directory that does not exist: an error naming the file.
        let err = write_atomically(&dir.join("missing/x"), b"").unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
