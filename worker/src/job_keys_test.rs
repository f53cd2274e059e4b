//! Every key of the job file changes what the component built from it does, so that no key
//! can be accepted and then ignored (as `train.poly_power` once was). The coordinator's
//! keys are shown in its own `job_keys` test; this one shows the rest, on what a worker
//! builds from the job: the model and datasets ([`Prepared`]), the learning-rate schedule,
//! the loader's first step, one training step, the device choice, and the cadence of
//! checkpoints and evaluations.

use std::path::PathBuf;
use std::sync::OnceLock;

use bertrain_coordinator::job::{self, JobConfig, Override};
use bertrain_coordinator::job_keys::READ_BY_COORDINATOR;
use bertrain_dataprep::cli::{VocabArgs, run_vocab};
use bertrain_dataprep::{DataprepConfig, synth_corpus};
use bertrain_model::{
    BertConfig, BertForPreTraining, ParamLayout, hf, init_bert, load_flat_params,
};
use sha2::{Digest, Sha256};

use crate::CpuBackend;
use crate::checkpoint::Saver;
use crate::collective::LocalCollective;
use crate::device::{self, DeviceChoice};
use crate::eval::Evaluator;
use crate::loader::{BatchShape, SampleSource, step_data};
use crate::prepare::Prepared;
use crate::schedule::LrSchedule;
use crate::trainer::Trainer;

/// Two small datasets of the project's synthetic corpus (A and B, other dataprep seeds),
/// with validation splits, and beside them what the model keys point at.
struct Data {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let corpus = root.join("corpus.txt");
        let docs: Vec<String> = synth_corpus(120, 3).collect();
        std::fs::write(&corpus, docs.join("\n\n") + "\n").unwrap();
        let vocab = root.join("vocab/vocab.txt");
        run_vocab(VocabArgs {
            input: vec![corpus.clone()],
            vocab_size: 1000,
            lowercase: false,
            cased: false,
            output: vocab.clone(),
            overwrite: false,
        })
        .unwrap();
        for (name, seed) in [("a", 1), ("b", 2)] {
            let mut c = DataprepConfig::new(vec![corpus.clone()], vocab.clone(), root.join(name));
            c.options.seed = seed;
            c.options.dupe_factor = 1;
            c.options.validation_fraction = 0.2;
            c.show_progress = false;
            bertrain_dataprep::pipeline::run(&c).unwrap();
        }
        // Two model configs and two HF directories of the dataset's vocabulary size.
        let vocab_size = bertrain_dataprep::Manifest::load(&root.join("a"))
            .unwrap()
            .vocab_size;
        for (name, layers, seed) in [("one", 1, 1), ("two", 2, 2)] {
            let mut config = BertConfig::preset("tiny").unwrap();
            config.vocab_size = vocab_size;
            config.num_hidden_layers = layers;
            std::fs::write(root.join(format!("{name}.json")), config.to_hf_json()).unwrap();
            let model = init_bert::<burn::backend::Flex>(&config, seed, &Default::default());
            let flat = bertrain_model::flatten_params(&model);
            let hf_dir = root.join(format!("hf-{name}"));
            hf::save_dir(
                &hf_dir,
                &config,
                &ParamLayout::of(&model),
                &flat,
                Some(&vocab),
            )
            .unwrap();
        }
        Data { _dir: dir, root }
    })
}

fn job_file(model: &str) -> String {
    format!(
        "[model]\n{model}\n[data]\nmanifest = \"a/manifest.json\"\nvalidation_manifest = \"a/validation/manifest.json\"\n\
         [train]\nglobal_batch_size = 8\nmicro_batch_size = 4\nmax_steps = 30\nwarmup_steps = 5\ndecay = \"poly\"\nlr = 1e-3\n\
         [checkpoint]\nevery_steps = 5\n[eval]\nevery_steps = 5\nmax_batches = 1\n[cluster]\nbackend = \"cuda\"\n"
    )
}

fn hash(bytes: &[u8]) -> String {
    bertrain_files::hex(&Sha256::digest(bytes))[..16].to_string()
}

/// What the worker builds from `job` and does with it, written out.
fn what_the_worker_does(job: &JobConfig) -> String {
    let t = &job.train;
    let prepared = Prepared::new(job).unwrap();
    let mut out = format!(
        "model {} initial {} data {} validation {:?}\n",
        hash(prepared.config.to_hf_json().as_bytes()),
        hash(bytemuck::cast_slice(&prepared.initial)),
        prepared.train.content_hash(),
        prepared.validation.as_ref().map(|m| m.content_hash()),
    );
    let schedule = LrSchedule::from_job(t);
    let lrs: Vec<f64> = (0..40).map(|s| schedule.at(s)).collect();
    out += &format!("lr {lrs:?}\n");

    let mut source =
        SampleSource::for_training(prepared.train.clone(), job, &prepared.config).unwrap();
    let data = step_data(&mut source, BatchShape::from_job(t, 0, 1), 0).unwrap();
    let rows: Vec<usize> = data.micro_batches.iter().map(|b| b.rows).collect();
    out += &format!("step 0 samples {:?} micro-batches {rows:?}\n", data.samples);

    let device = Default::default();
    let model = BertForPreTraining::<CpuBackend>::new(&prepared.config, &device);
    let layout = ParamLayout::of(&model);
    let model = load_flat_params(model, &prepared.initial, &layout);
    let mut trainer = Trainer::from_job(model, t, device);
    let lr = schedule.at(0) as f32;
    trainer
        .step(0, 0, &data.micro_batches, lr, false, &mut LocalCollective)
        .unwrap();
    out += &format!(
        "after one step {}\n",
        hash(bytemuck::cast_slice(&trainer.params))
    );

    let choice = DeviceChoice::from_job(job, 0);
    let peak = device::peak(choice, job.cluster.device_peak_tflops).map(|p| p.tflops);
    out += &format!("device {choice:?} peak {peak:?}\n");

    let saver = Saver::from_job(job, &prepared, 1).unwrap();
    let validation = prepared.validation.clone().unwrap();
    let evaluator = Evaluator::from_job(validation, job, &prepared.config, 0, 1).unwrap();
    let due = |f: &dyn Fn(u64) -> bool| (1..=30).filter(|&s| f(s)).collect::<Vec<_>>();
    out += &format!(
        "checkpoints after {:?} evaluations after {:?} of {} samples\n",
        due(&|s| saver.due(s)),
        due(&|s| evaluator.due(s)),
        evaluator.shape.global_batch
    );
    out
}

/// A key, the `[model]` section its job uses, and a value other than that job's.
struct Probe {
    key: &'static str,
    model: &'static str,
    value: &'static str,
}

const TINY: &str = "preset = \"tiny\"";

fn probe(key: &'static str, value: &'static str) -> Probe {
    Probe {
        key,
        model: TINY,
        value,
    }
}

fn probes() -> Vec<Probe> {
    vec![
        probe("model.preset", "mini"),
        Probe {
            key: "model.config",
            model: "config = \"one.json\"",
            value: "\"two.json\"",
        },
        Probe {
            key: "model.init_from",
            model: "init_from = \"hf-one\"",
            value: "\"hf-two\"",
        },
        probe("data.manifest", "\"b/manifest.json\""),
        probe("data.validation_manifest", "\"b/validation/manifest.json\""),
        probe("data.length_bins", "true"),
        probe("train.global_batch_size", "16"),
        probe("train.micro_batch_size", "2"),
        probe("train.max_steps", "40"),
        probe("train.optimizer", "lamb"),
        probe("train.lr", "5e-4"),
        probe("train.warmup_steps", "10"),
        probe("train.decay", "linear"),
        probe("train.poly_power", "2.0"),
        probe("train.weight_decay", "0.5"),
        probe("train.max_grad_norm", "1e-4"),
        probe("train.seed", "7"),
        probe("train.precision", "bf16"),
        probe("checkpoint.every_steps", "7"),
        probe("eval.every_steps", "7"),
        probe("eval.max_batches", "2"),
        probe("cluster.backend", "cpu"),
        probe("cluster.device_peak_tflops", "100.0"),
    ]
}

#[test]
fn every_job_key_changes_what_its_component_does() {
    let probes = probes();
    // Every key of the job file is shown here or by the coordinator's test, once.
    let mut covered: Vec<&str> = probes.iter().map(|p| p.key).collect();
    covered.extend(READ_BY_COORDINATOR);
    covered.sort();
    let mut keys = job::keys();
    keys.sort();
    assert_eq!(covered, keys, "every job key needs one probe");

    let root = &data().root;
    let job = |model: &str, set: Option<&str>| {
        let overrides: Vec<Override> = set.into_iter().map(|s| s.parse().unwrap()).collect();
        JobConfig::from_toml_str(&job_file(model), "job.toml", root, &overrides).unwrap()
    };
    let tiny = what_the_worker_does(&job(TINY, None));
    for p in probes {
        let default = match p.model {
            TINY => tiny.clone(),
            model => what_the_worker_does(&job(model, None)),
        };
        let set = format!("{}={}", p.key, p.value);
        let changed = what_the_worker_does(&job(p.model, Some(&set)));
        assert_ne!(
            default, changed,
            "--set {set} changed nothing the worker does"
        );
    }
}

/// Bad input beside the keys, on the same datasets: a dataset whose rows are longer than
/// the model's positions is refused before training, in one line naming the dataset, its
/// longest rows and the limit; and a row longer than its dataset says (a dataset not
/// written by dataprep) is refused by the loader, naming the shard and row, instead of
/// reaching the embedding.
#[test]
fn rows_longer_than_the_models_positions_are_refused() {
    let root = &data().root;
    let mut config = BertConfig::preset("tiny").unwrap();
    config.vocab_size = bertrain_dataprep::Manifest::load(&root.join("a"))
        .unwrap()
        .vocab_size;
    config.max_position_embeddings = 64;
    let short = root.join("short-positions.json");
    std::fs::write(&short, config.to_hf_json()).unwrap();
    let model = format!("config = \"{}\"", short.display());
    let job = JobConfig::from_toml_str(&job_file(&model), "job.toml", root, &[]).unwrap();
    let err = format!("{:#}", Prepared::new(&job).err().expect("refused"));
    assert!(
        err.contains("rows of up to 128 tokens")
            && err.contains("max_position_embeddings = 64")
            && err.contains(&root.join("a").display().to_string()),
        "{err}"
    );

    let manifest = bertrain_dataprep::Manifest::load(&root.join("a")).unwrap();
    config.max_position_embeddings = 20;
    let mut source = SampleSource::new(manifest.clone(), 0, &config).unwrap();
    let shape = BatchShape {
        global_batch: 8,
        micro_batch: 8,
        rank: 0,
        world: 1,
    };
    let err = format!(
        "{:#}",
        step_data(&mut source, shape, 0).err().expect("refused")
    );
    assert!(
        err.contains(&manifest.shards[0].file)
            && err.contains("more than the model's 20 positions"),
        "{err}"
    );
}
