//! The job's shared secret: workers present it when they join.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::job::JobConfig;

/// The job's token: read from `cluster.token_file` when set (it must exist), otherwise
/// from `run_dir/token`, which is created with a fresh random secret (mode 0600) the first
/// time. `launch` calls this before starting anything so its workers can read the file.
pub fn ensure_token(job: &JobConfig) -> Result<String> {
    let path = job.token_path();
    if job.cluster.token_file.is_some() || path.exists() {
        return read_token(&path);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let token = random_hex(32)?;
    // Written under a temporary name and renamed, so a reader never sees a partial token.
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("creating token file {}", temp.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing token file {}", temp.display()))?;
    std::fs::rename(&temp, &path)
        .with_context(|| format!("creating token file {}", path.display()))?;
    tracing::info!(path = %path.display(), "created a new job token");
    Ok(token)
}

/// Reads a token file (surrounding whitespace ignored).
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "token file {} is empty; put the job's secret in it",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// `bytes` random bytes from the kernel, as hex.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for a job token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares in time independent of where the strings differ, so the token cannot be
/// guessed byte by byte from response times.
pub(crate) fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
