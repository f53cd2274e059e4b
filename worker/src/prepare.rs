//! What a worker builds from the job before it joins: the model's shape and initial
//! weights, the datasets, their fingerprints, and the address its peers reach it at.

use std::net::{ToSocketAddrs, UdpSocket};

use anyhow::{Context, Result, bail};
use bertrain_coordinator::Fingerprint;
use bertrain_coordinator::job::JobConfig;
use bertrain_dataprep::Manifest;
use bertrain_files::hex;
use bertrain_model::{BertConfig, BertForPreTraining, ParamLayout, hf, init_bert};
use sha2::{Digest, Sha256};

/// The address of this machine's interface on the route to `coordinator`: what the
/// other workers can most likely reach. No packet is sent (UDP "connect" only routes).
pub(crate) fn route_address(coordinator: &str) -> Result<String> {
    let target = coordinator
        .to_socket_addrs()
        .with_context(|| format!("resolving the coordinator address {coordinator}"))?
        .next()
        .with_context(|| format!("the coordinator address {coordinator} resolves to nothing"))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).context("finding this machine's address")?;
    socket.connect(target).with_context(|| {
        format!("no route to the coordinator {coordinator}; pass --advertise HOST")
    })?;
    Ok(socket.local_addr()?.ip().to_string())
}

/// What the worker builds from the job before it joins: the model's shape and initial
/// weights, and the datasets.
pub struct Prepared {
    pub job: JobConfig,
    pub config: BertConfig,
    /// Initial parameters in `ParamLayout` order (rank 0's are broadcast to all ranks).
    pub initial: Vec<f32>,
    pub train: Manifest,
    pub validation: Option<Manifest>,
}

impl Prepared {
    pub fn new(job: &JobConfig) -> Result<Prepared> {
        let train = Manifest::load_verified(&job.data.manifest)?;
        let validation = job
            .data
            .validation_manifest
            .as_deref()
            .map(Manifest::load_verified)
            .transpose()?;
        let (config, initial) = initial_model(job, &train)?;
        Ok(Prepared {
            job: job.clone(),
            config,
            initial,
            train,
            validation,
        })
    }

    /// Hash of the settings a resumed run must share with the run it continues.
    pub(crate) fn job_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.config.to_hf_json().as_bytes());
        h.update(format!(
            "seed={};batch={}",
            self.job.train.seed, self.job.train.global_batch_size
        ));
        hex(&h.finalize())
    }

    pub(crate) fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(self.config.to_hf_json().as_bytes());
        h.update(bytemuck::cast_slice::<f32, u8>(&self.initial));
        Fingerprint {
            model_hash: hex(&h.finalize()),
            dataset_hash: self.train.content_hash(),
            held_step: None,
        }
    }
}

/// The model the job names, with its initial parameters. A preset takes its vocabulary
/// size from the dataset; a config file or initial weights must agree with it.
fn initial_model(job: &JobConfig, data: &Manifest) -> Result<(BertConfig, Vec<f32>)> {
    let m = &job.model;
    let config = if let Some(preset) = &m.preset {
        let name = preset.strip_prefix("bert-").unwrap_or(preset);
        let mut config =
            BertConfig::preset(name).with_context(|| format!("model.preset = {preset:?}"))?;
        config.vocab_size = data.vocab_size;
        config
    } else if let Some(path) = &m.config {
        BertConfig::load(path)?
    } else if let Some(dir) = &m.init_from {
        BertConfig::load(&dir.join(hf::CONFIG_FILE))
            .with_context(|| format!("model.init_from = {}", dir.display()))?
    } else {
        bail!("[model] needs one of preset, config or init_from");
    };
    if config.vocab_size != data.vocab_size {
        bail!(
            "the model's vocab_size is {} but dataset {} was made with a vocabulary of {}; \
             use the vocabulary the model was trained with (or a preset, which adopts the dataset's)",
            config.vocab_size,
            data.dir().display(),
            data.vocab_size
        );
    }
    if config.max_position_embeddings < data.max_seq_len {
        bail!(
            "dataset {} holds rows of up to {} tokens (its max_seq_len), more than the model's \
             max_position_embeddings = {}; remake the dataset with --max-seq-len {} or use a model with more positions",
            data.dir().display(),
            data.max_seq_len,
            config.max_position_embeddings,
            config.max_position_embeddings
        );
    }
    let shape = BertForPreTraining::<burn::backend::Flex>::new(&config, &Default::default());
    let layout = ParamLayout::of(&shape);
    let flat = match &m.init_from {
        Some(dir) => {
            let loaded = hf::load_dir(dir, &layout, job.train.seed)?;
            if !loaded.initialised.is_empty() {
                tracing::warn!(
                    "{} has no pretraining heads; initialised {} of them: {}",
                    dir.display(),
                    loaded.initialised.len(),
                    loaded.initialised.join(", ")
                );
            }
            loaded.flat
        }
        None => bertrain_model::flatten_params(&init_bert::<burn::backend::Flex>(
            &config,
            job.train.seed,
            &Default::default(),
        )),
    };
    Ok((config, flat))
}
