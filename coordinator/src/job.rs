//! The job file: one TOML document describing a training run, plus `--set` overrides.
//!
//! Every key is documented on its field below (the README's reference is generated from
//! these comments). Unknown keys are errors, because a misspelt key silently falling back
//! to its default is the kind of mistake that costs a day of cluster time.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A whole job, as loaded from the job file with overrides applied and paths resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub job: JobSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    pub eval: EvalSection,
    pub cluster: ClusterSection,
}

/// `[job]`: naming and where output goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Name of the job, shown in logs and on the status page. Default: `"bertrain"`.
    pub name: String,
    /// Directory for everything the job writes (`metrics.jsonl`, `checkpoints/`, the
    /// coordinator's journal, the generated token). Default: `runs/<name>` next to the job file.
    pub run_dir: PathBuf,
    /// `"never"` starts a fresh run (refused if `run_dir` already holds one); `"auto"`
    /// continues from the newest committed checkpoint when there is one. `--resume` on the
    /// command line sets `"auto"`. Default: `"never"`.
    pub resume: Resume,
}

/// `[model]`: exactly one of `preset`, `config` or `init_from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A built-in model size, e.g. `"tiny"`, `"bert-base"`, `"bert-large"`.
    pub preset: Option<String>,
    /// A BERT `config.json` (HF format) describing the model to train from scratch.
    pub config: Option<PathBuf>,
    /// Start from existing weights: an HF model directory or a bertrain checkpoint directory.
    pub init_from: Option<PathBuf>,
}

/// `[data]`: the training data, as written by `bertrain dataprep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// The training set's `manifest.json` (required).
    pub manifest: PathBuf,
    /// A validation set's `manifest.json`; without it evaluation is skipped. Optional.
    pub validation_manifest: Option<PathBuf>,
    /// Order each shuffle window's rows by length before cutting them into steps, so
    /// that a step's sequences have about one length and attention pads little (see
    /// `DataPlan::length_binned` in the worker's `plan`). Default: on for datasets whose
    /// `max_seq_len` is 256 or more, where lengths vary most.
    pub length_bins: Option<bool>,
}

impl DataSection {
    /// Whether training reads the dataset in length bins, for a dataset of `max_seq_len`.
    pub fn length_bins_for(&self, max_seq_len: usize) -> bool {
        self.length_bins.unwrap_or(max_seq_len >= 256)
    }
}

/// `[train]`: optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Samples per optimizer step, over all workers. Must be a multiple of
    /// `cluster.world_size * micro_batch_size`; the quotient is the number of gradient
    /// accumulation steps. Default: 256.
    pub global_batch_size: u64,
    /// Samples per forward/backward pass on one worker. Default: 32.
    pub micro_batch_size: u64,
    /// Optimizer steps to run. Default: 1000.
    pub max_steps: u64,
    /// `"adamw"` or `"lamb"`. Default: `"adamw"`.
    pub optimizer: Optimizer,
    /// Peak learning rate, reached at the end of warmup. Default: 1e-4.
    pub lr: f64,
    /// Steps of linear warmup from 0 to `lr`. Default: 0.
    pub warmup_steps: u64,
    /// Decay after warmup down to 0 at `max_steps`: `"linear"` or `"poly"`. Default: `"linear"`.
    pub decay: Decay,
    /// Exponent of the `"poly"` decay, `lr * (1 - progress)^poly_power`. Default: 0.5.
    pub poly_power: f64,
    /// Decoupled weight decay; biases and LayerNorm parameters are excluded. Default: 0.01.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping. Default: 1.0.
    pub max_grad_norm: f64,
    /// Seed of everything random: initialisation, data order, masking at train time. Default: 42.
    pub seed: u64,
    /// `"fp32"` or `"bf16"` (bf16 compute with fp32 master weights; CUDA only). Default: `"fp32"`.
    pub precision: Precision,
}

/// `[checkpoint]`: when to save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save a checkpoint every this many steps (and always at the end); 0 saves only at the
    /// end. Default: 1000.
    pub every_steps: u64,
    /// Committed checkpoints to keep; older ones are deleted, the newest never. Default: 3.
    pub keep_last: u32,
}

/// `[eval]`: validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate on `data.validation_manifest` every this many steps (and always at the end);
    /// 0 evaluates only at the end. Default: 1000.
    pub every_steps: u64,
    /// Micro-batches per evaluation on each worker; 0 uses the whole validation split.
    /// Default: 100.
    pub max_batches: u64,
}

/// `[cluster]`: where the coordinator listens and how workers talk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `host:port` of the coordinator: workers connect here, and the coordinator listens
    /// here unless `--listen` says otherwise. Default: `"127.0.0.1:29500"`.
    pub coordinator: String,
    /// `host:port` of the HTTP status server (`/`, `/status`, `/metrics`). Default: the
    /// coordinator's host with its port + 1.
    pub http: Option<String>,
    /// Number of workers; the job starts when this many have joined. Default: 1.
    pub world_size: u32,
    /// `"cpu"` (TCP ring all-reduce) or `"cuda"` (NCCL). Default: `"cpu"`.
    pub backend: Backend,
    /// File holding the secret that workers present when they join. Default: `run_dir/token`,
    /// created with a random secret (mode 0600) when missing.
    pub token_file: Option<PathBuf>,
    /// Seconds between a worker's heartbeats. Default: 1.
    pub heartbeat_interval_s: f64,
    /// A worker silent for this many seconds is declared dead. Default: 10.
    pub heartbeat_timeout_s: f64,
    /// A job in which no step completes for this many seconds is declared hung (first step
    /// included, so allow for model loading). Default: 900.
    pub step_timeout_s: f64,
    /// Dense peak of one device in TFLOP/s, which the workers' MFU figures are relative to.
    /// Default: the bf16 dense peak of known NVIDIA data-centre GPUs (H100, H200, A100,
    /// L40S); none on the CPU, where MFU is then not computed.
    pub device_peak_tflops: Option<f64>,
    /// Times the worker set may be restarted after a lost, failed or hung worker before the
    /// job is given up. Default: 3.
    pub max_restarts: u32,
    /// Elastic jobs: when a lost worker is not back within `rejoin_timeout_s`, training goes
    /// on with as few as this many workers (at the same global batch, with more
    /// accumulation), and takes returning workers back at the next step boundary.
    /// Default: `world_size` (not elastic).
    pub min_workers: Option<u32>,
    /// Seconds an elastic job waits for lost workers to come back before it goes on without
    /// them. Default: 60.
    pub rejoin_timeout_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Resume {
    #[default]
    Never,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    Adamw,
    Lamb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Linear,
    Poly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

impl Default for JobSection {
    fn default() -> Self {
        JobSection {
            name: "bertrain".into(),
            run_dir: PathBuf::new(),
            resume: Resume::Never,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            global_batch_size: 256,
            micro_batch_size: 32,
            max_steps: 1000,
            optimizer: Optimizer::Adamw,
            lr: 1e-4,
            warmup_steps: 0,
            decay: Decay::Linear,
            poly_power: 0.5,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 42,
            precision: Precision::Fp32,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 1000,
            keep_last: 3,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every_steps: 1000,
            max_batches: 100,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            coordinator: "127.0.0.1:29500".into(),
            http: None,
            world_size: 1,
            backend: Backend::Cpu,
            token_file: None,
            heartbeat_interval_s: 1.0,
            heartbeat_timeout_s: 10.0,
            step_timeout_s: 900.0,
            device_peak_tflops: None,
            max_restarts: 3,
            min_workers: None,
            rejoin_timeout_s: 60.0,
        }
    }
}

/// One `--set section.key=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub section: String,
    pub key: String,
    pub value: toml::Value,
    /// The text the user typed, for error messages.
    pub source: String,
}

impl std::str::FromStr for Override {
    type Err = anyhow::Error;

    /// Parses `section.key=value`; the value is read as TOML (`3e-4`, `true`, `"x"`) and
    /// falls back to a plain string so that `--set model.preset=tiny` works unquoted.
    fn from_str(text: &str) -> Result<Self> {
        let Some((path, raw)) = text.split_once('=') else {
            bail!("--set {text}: expected section.key=value");
        };
        let Some((section, key)) = path.trim().split_once('.') else {
            bail!("--set {text}: the key must be section.key, e.g. train.lr");
        };
        if section.is_empty() || key.is_empty() || key.contains('.') {
            bail!("--set {text}: the key must be section.key, e.g. train.lr");
        }
        let raw = raw.trim();
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        Ok(Override {
            section: section.into(),
            key: key.into(),
            value,
            source: text.into(),
        })
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--set {}", self.source)
    }
}

impl JobConfig {
    /// Reads a job file, applies `overrides`, checks every key and value, and resolves the
    /// paths in it relative to the file's directory.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading job file {}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Self::from_toml_str(&text, &path.display().to_string(), &base, overrides)
    }

    /// [`JobConfig::load`] on text already in memory; `origin` names it in errors and
    /// relative paths are taken relative to `base`.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        base: &Path,
        overrides: &[Override],
    ) -> Result<JobConfig> {
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("{origin}: {}", one_line(&e.to_string()))
        })?;
        let schema = known_keys();
        check_keys(&doc, &schema, &format!("in {origin}"))?;
        for o in overrides {
            check_key(&o.section, &o.key, &schema, &format!("in {o}"))?;
            let section = doc
                .entry(o.section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section) = section else {
                bail!("{origin}: {} is not a table", o.section);
            };
            section.insert(o.key.clone(), o.value.clone());
        }
        let mut job: JobConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| describe_value_error(&e, origin))?;
        job.resolve_paths(base);
        job.validate()
            .with_context(|| format!("invalid job {origin}"))?;
        Ok(job)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        if self.job.run_dir.as_os_str().is_empty() {
            self.job.run_dir = Path::new("runs").join(&self.job.name);
        }
        self.job.run_dir = abs(&self.job.run_dir);
        self.model.config = self.model.config.as_deref().map(abs);
        self.model.init_from = self.model.init_from.as_deref().map(abs);
        if !self.data.manifest.as_os_str().is_empty() {
            self.data.manifest = abs(&self.data.manifest);
        }
        self.data.validation_manifest = self.data.validation_manifest.as_deref().map(abs);
        self.cluster.token_file = self.cluster.token_file.as_deref().map(abs);
    }

    /// Checks values that are well-typed but unusable, each error saying what to change.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let c = &self.cluster;
        if self.job.name.trim().is_empty() {
            bail!("job.name is empty; give the job a name");
        }
        let models = [
            self.model.preset.is_some(),
            self.model.config.is_some(),
            self.model.init_from.is_some(),
        ];
        if models.iter().filter(|&&m| m).count() != 1 {
            bail!(
                "[model] needs exactly one of preset, config or init_from (e.g. preset = \"tiny\")"
            );
        }
        if self.data.manifest.as_os_str().is_empty() {
            bail!(
                "data.manifest is missing; point it at the manifest.json written by `bertrain dataprep`"
            );
        }
        for (name, v) in [
            ("train.global_batch_size", t.global_batch_size),
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.max_steps", t.max_steps),
        ] {
            if v == 0 {
                bail!("{name} = 0; it must be at least 1");
            }
        }
        if c.world_size == 0 {
            bail!("cluster.world_size = 0; it must be at least 1");
        }
        if t.precision == Precision::Bf16 && c.backend != Backend::Cuda {
            bail!(
                "train.precision = \"bf16\" needs cluster.backend = \"cuda\"; on the CPU use \"fp32\""
            );
        }
        if let Some(min) = c.min_workers {
            let per_pass = u64::from(min) * t.micro_batch_size;
            if min == 0 || min > c.world_size || !t.global_batch_size.is_multiple_of(per_pass) {
                bail!(
                    "cluster.min_workers = {min}; it must be between 1 and cluster.world_size ({}), \
                     and train.global_batch_size ({}) a multiple of min_workers x train.micro_batch_size ({per_pass})",
                    c.world_size,
                    t.global_batch_size
                );
            }
        }
        let per_pass = u64::from(c.world_size) * t.micro_batch_size;
        if !t.global_batch_size.is_multiple_of(per_pass) {
            let lower = (t.global_batch_size / per_pass).max(1) * per_pass;
            bail!(
                "train.global_batch_size = {} is not a multiple of cluster.world_size ({}) x train.micro_batch_size ({}) = {per_pass}; \
                 set global_batch_size to a multiple of {per_pass} (e.g. {lower}) or change micro_batch_size",
                t.global_batch_size,
                c.world_size,
                t.micro_batch_size
            );
        }
        for (name, v) in [
            ("train.lr", t.lr),
            ("train.weight_decay", t.weight_decay),
            ("train.max_grad_norm", t.max_grad_norm),
            ("train.poly_power", t.poly_power),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} = {v}; it must be a finite number >= 0");
            }
        }
        if t.lr == 0.0 {
            bail!("train.lr = 0; nothing would be learned, set a positive learning rate");
        }
        if t.warmup_steps > t.max_steps {
            bail!(
                "train.warmup_steps = {} exceeds train.max_steps = {}; shorten the warmup",
                t.warmup_steps,
                t.max_steps
            );
        }
        if self.checkpoint.keep_last == 0 {
            bail!("checkpoint.keep_last = 0; keep at least 1 checkpoint");
        }
        for (name, v) in [
            ("cluster.heartbeat_interval_s", c.heartbeat_interval_s),
            ("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s),
            ("cluster.step_timeout_s", c.step_timeout_s),
            ("cluster.rejoin_timeout_s", c.rejoin_timeout_s),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 1e6 {
                bail!("{name} = {v}; it must be a positive number of seconds");
            }
        }
        if c.heartbeat_timeout_s < 2.0 * c.heartbeat_interval_s {
            bail!(
                "cluster.heartbeat_timeout_s = {} must be at least twice cluster.heartbeat_interval_s = {}",
                c.heartbeat_timeout_s,
                c.heartbeat_interval_s
            );
        }
        if let Some(peak) = c.device_peak_tflops
            && !(peak.is_finite() && peak > 0.0)
        {
            bail!("cluster.device_peak_tflops = {peak}; it must be a positive number of TFLOP/s");
        }
        check_host_port("cluster.coordinator", &c.coordinator)?;
        if let Some(http) = &c.http {
            check_host_port("cluster.http", http)?;
        }
        Ok(())
    }

    /// Gradient accumulation steps per optimizer step on each worker.
    pub fn accumulation_steps(&self) -> u64 {
        self.train.global_batch_size
            / (u64::from(self.cluster.world_size) * self.train.micro_batch_size)
    }

    /// Where the HTTP status server listens: `cluster.http`, or the coordinator's host with
    /// port + 1 (port 0 stays 0, i.e. any free port).
    pub fn http_address(&self, coordinator_listen: &str) -> Result<String> {
        if let Some(http) = &self.cluster.http {
            return Ok(http.clone());
        }
        let (host, port) = check_host_port("coordinator address", coordinator_listen)?;
        let port = if port == 0 {
            0
        } else {
            port.checked_add(1)
                .context("coordinator port 65535 leaves no room for HTTP; set cluster.http")?
        };
        Ok(format!("{host}:{port}"))
    }

    /// Where the job's token lives: `cluster.token_file` or `run_dir/token`.
    pub fn token_path(&self) -> PathBuf {
        self.cluster
            .token_file
            .clone()
            .unwrap_or_else(|| self.job.run_dir.join("token"))
    }
}

fn check_host_port<'a>(name: &str, addr: &'a str) -> Result<(&'a str, u16)> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("{name} = {addr:?} is not host:port (e.g. 127.0.0.1:29500)");
    };
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("{name} = {addr:?}: port {port:?} is not a number 0-65535"))?;
    if host.is_empty() {
        bail!("{name} = {addr:?} has no host (e.g. 127.0.0.1:29500)");
    }
    Ok((host, port))
}

/// Every key of the job file, as `section.key`.
pub fn keys() -> Vec<String> {
    known_keys()
        .into_iter()
        .flat_map(|(section, keys)| keys.into_iter().map(move |k| format!("{section}.{k}")))
        .collect()
}

/// Every `section -> keys` the job file accepts, read off the structs themselves so that
/// the list cannot drift from them.
fn known_keys() -> BTreeMap<String, Vec<String>> {
    let value = serde_json::to_value(JobConfig::default()).unwrap_or_default();
    let mut out = BTreeMap::new();
    if let serde_json::Value::Object(sections) = value {
        for (name, section) in sections {
            let keys = match section {
                serde_json::Value::Object(keys) => keys.keys().cloned().collect(),
                _ => Vec::new(),
            };
            out.insert(name, keys);
        }
    }
    out
}

fn check_keys(
    doc: &toml::Table,
    schema: &BTreeMap<String, Vec<String>>,
    origin: &str,
) -> Result<()> {
    for (section, value) in doc {
        let Some(_) = schema.get(section) else {
            bail!(
                "unknown section [{section}] {origin}; known sections: {}",
                schema.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let toml::Value::Table(keys) = value else {
            bail!("{section} {origin} must be a [{section}] table, not a value");
        };
        for key in keys.keys() {
            check_key(section, key, schema, origin)?;
        }
    }
    Ok(())
}

fn check_key(
    section: &str,
    key: &str,
    schema: &BTreeMap<String, Vec<String>>,
    origin: &str,
) -> Result<()> {
    let Some(keys) = schema.get(section) else {
        bail!(
            "unknown section [{section}] {origin}; known sections: {}",
            schema.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    if !keys.iter().any(|k| k == key) {
        bail!(
            "unknown key {section}.{key} {origin}; [{section}] accepts: {}",
            keys.join(", ")
        );
    }
    Ok(())
}

/// toml reports a bad value as "invalid type: ..., expected f64\nin `train.lr`"; turn it
/// into one line that leads with the key.
fn describe_value_error(err: &toml::de::Error, origin: &str) -> anyhow::Error {
    let text = err.to_string();
    let mut message = Vec::new();
    let mut key = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix("in `").and_then(|l| l.strip_suffix('`')) {
            Some(k) => key = Some(k.to_string()),
            None => message.push(line),
        }
    }
    match key {
        Some(key) => anyhow::anyhow!("{origin}: {key}: {}", message.join(" ")),
        None => anyhow::anyhow!("{origin}: {}", message.join(" ")),
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npreset = \"tiny\"\n[data]\nmanifest = \"data/manifest.json\"\n";

    fn load(text: &str, overrides: &[&str]) -> Result<JobConfig> {
        let overrides: Vec<Override> =
            overrides.iter().map(|s| s.parse()).collect::<Result<_>>()?;
        JobConfig::from_toml_str(text, "job.toml", Path::new("/jobs"), &overrides)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let job = load(MINIMAL, &[]).unwrap();
        assert_eq!(job.data.manifest, PathBuf::from("/jobs/data/manifest.json"));
        assert_eq!(job.job.run_dir, PathBuf::from("/jobs/runs/bertrain"));
        assert_eq!(job.train.global_batch_size, 256);
        assert_eq!(job.token_path(), PathBuf::from("/jobs/runs/bertrain/token"));
        assert_eq!(job.accumulation_steps(), 8);
    }

    #[test]
    fn unknown_keys_name_file_and_key() {
        let err = load(&format!("{MINIMAL}[train]\nlrr = 1.0\n"), &[]).unwrap_err();
        assert!(
            format!("{err:#}").starts_with("unknown key train.lrr in job.toml"),
            "{err:#}"
        );
        let err = load(&format!("{MINIMAL}[trian]\nlr = 1.0\n"), &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown section [trian] in job.toml"),
            "{err:#}"
        );
        let err = load(MINIMAL, &["train.lrr=3"]).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown key train.lrr in --set train.lrr=3"),
            "{err:#}"
        );
    }

    #[test]
    fn overrides_parse_as_toml_then_string() {
        let job = load(
            MINIMAL,
            &[
                "train.lr=3e-4",
                "job.name=demo",
                "cluster.world_size=2",
                "train.optimizer=lamb",
            ],
        )
        .unwrap();
        assert_eq!(job.train.lr, 3e-4);
        assert_eq!(job.job.name, "demo");
        assert_eq!(job.cluster.world_size, 2);
        assert_eq!(job.train.optimizer, Optimizer::Lamb);
        assert_eq!(job.job.run_dir, PathBuf::from("/jobs/runs/demo"));
        assert!("train.lr".parse::<Override>().is_err());
        assert!("lr=3".parse::<Override>().is_err());
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = load(&format!("{MINIMAL}[train]\nlr = \"fast\"\n"), &[]).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("job.toml: train.lr: invalid type"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
        let err = load(&format!("{MINIMAL}[train]\noptimizer = \"sgd\"\n"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("train.optimizer"), "{err:#}");
    }

    #[test]
    fn bf16_needs_the_cuda_backend() {
        let err = load(MINIMAL, &["train.precision=bf16"]).unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("train.precision = \"bf16\" needs cluster.backend = \"cuda\""),
            "{err:#}"
        );
        let job = load(MINIMAL, &["train.precision=bf16", "cluster.backend=cuda"]).unwrap();
        assert_eq!(job.train.precision, Precision::Bf16);
    }

    #[test]
    fn min_workers_must_fit_the_world_and_the_batch() {
        let elastic = |min: &str, batch: &str| {
            let sets = [
                "cluster.world_size=4".to_string(),
                format!("cluster.min_workers={min}"),
                format!("train.global_batch_size={batch}"),
                "train.micro_batch_size=8".to_string(),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            load(MINIMAL, &sets).map_err(|e| format!("{e:#}"))
        };
        assert!(elastic("2", "64").is_ok());
        for (min, batch) in [("0", "64"), ("5", "64"), ("3", "64")] {
            let err = elastic(min, batch).unwrap_err();
            assert!(
                err.contains(&format!("cluster.min_workers = {min}")),
                "{err}"
            );
        }
    }

    #[test]
    fn batch_divisibility_says_what_to_change() {
        let err = load(
            MINIMAL,
            &["train.global_batch_size=100", "cluster.world_size=2"],
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("multiple of 64 (e.g. 64)"), "{text}");
        let err = load("[data]\nmanifest = \"m.json\"\n", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("exactly one of preset"),
            "{err:#}"
        );
    }

    #[test]
    fn http_address_defaults_to_next_port() {
        let job = load(MINIMAL, &[]).unwrap();
        assert_eq!(
            job.http_address("127.0.0.1:29500").unwrap(),
            "127.0.0.1:29501"
        );
        assert_eq!(job.http_address("127.0.0.1:0").unwrap(), "127.0.0.1:0");
    }

    #[test]
    fn schema_lists_every_field() {
        let keys = known_keys();
        assert_eq!(keys.len(), 7);
        assert!(keys["model"].contains(&"init_from".to_string()));
        assert!(keys["cluster"].contains(&"token_file".to_string()));
    }

    /// Every job file shipped in `configs/` loads and validates.
    #[test]
    fn shipped_job_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                JobConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert_eq!(seen, 5, "tiny, bert-base(-phase2), bert-large(-phase2)");
    }

    #[test]
    fn round_trips_through_json() {
        let job = load(MINIMAL, &[]).unwrap();
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<JobConfig>(&json).unwrap(), job);
    }
}
