//! Bad input at volume: seeded random mutations of real inputs fed to every decoder that
//! reads what a user or a peer supplies: the coordinator's frames (both directions), the
//! ring's frames, the job file, a dataset's manifest and Parquet shard, a vocabulary and HF
//! safetensors weights. The seeds are the real thing: a dataset made by `bertrain
//! dataprep`, the HF fixture made by `transformers` (tests/fixtures/make_hf_fixture.py),
//! frames and a job file as bertrain writes them.
//!
//! Each input must give `Ok` or an error with a message (naming the file, for files), never
//! a panic, and no single allocation while it is decoded may exceed the limit stated for
//! its decoder (a length field must not make a decoder allocate what the input does not
//! hold). Mutations: bit flips, interesting bytes and integers written at random offsets
//! (where length fields are), truncation, deleted and repeated spans, random bytes.
//! Deterministic: a failure reproduces with the same seed. `BERTRAIN_FUZZ_INPUTS` sets
//! the inputs per decoder (default 400).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use bertrain_coordinator::protocol::{
    CoordinatorMsg, JoinRequest, StepMetrics, WorkerMsg, read_frame, write_frame,
};
use bertrain_dataprep::{Manifest, SeededRng, Vocab, read_rows};
use bertrain_model::{BertConfig, BertForPreTraining, ParamLayout, hf};
use bertrain_worker::collective::wire::Framing;
use common::*;

/// The system allocator, recording the largest single request since the last reset.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

const MIB: usize = 1 << 20;

/// `seed` changed one to four times.
fn mutate(rng: &mut SeededRng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.range_inclusive(1, 4) {
        let at = rng.below(b.len().max(1));
        match rng.below(8) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = *rng.pick(&[0, 0xff, 0x7f, 0x80, b'"', b'{', b'\n']),
            2 => {
                let v = *rng.pick(&[u32::MAX, i32::MAX as u32, 1 << 31, 1 << 24, 0, 1]);
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let end = (at + 4).min(b.len());
                b.splice(at..end, bytes);
            }
            3 => {
                let v = *rng.pick(&[u64::MAX, i64::MAX as u64, 1 << 40, 1 << 32]);
                let end = (at + 8).min(b.len());
                b.splice(at..end, v.to_le_bytes());
            }
            4 => b.truncate(at),
            5 => {
                let end = (at + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            6 => {
                let end = (at + rng.below(256)).min(b.len());
                let span = b[at..end].to_vec();
                b.splice(at..at, span);
            }
            _ => {
                let n = rng.below(32);
                let noise: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, noise);
            }
        }
    }
    b
}

/// One decoder under test.
struct Target<'a> {
    name: &'a str,
    seed: Vec<u8>,
    /// The largest single allocation allowed while decoding one input.
    limit: usize,
    /// Decodes one input; an error's message must contain `names` (the file's name).
    decode: &'a dyn Fn(&[u8]) -> Result<()>,
    names: &'a str,
}

fn inputs_per_decoder() -> usize {
    std::env::var("BERTRAIN_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// Feeds mutations of the target's seed to it; returns how many were refused with an
/// error, or the first failure with the input that caused it saved next to the test's files.
fn fuzz(target: &Target, inputs: usize, save: &Path) -> Result<usize, String> {
    let mut refused = 0;
    let mut rng = SeededRng::from_parts(&[0xF022, target.name.len() as u64]);
    // The unchanged seed must decode.
    (target.decode)(&target.seed).map_err(|e| format!("{}: the seed fails: {e:#}", target.name))?;
    for i in 0..inputs {
        let input = mutate(&mut rng, &target.seed);
        LARGEST.store(0, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.decode)(&input)));
        let largest = LARGEST.load(Ordering::Relaxed);
        let failure = match outcome {
            Err(_) => Some("panicked".to_string()),
            Ok(_) if largest > target.limit => Some(format!(
                "allocated {largest} bytes at once (limit {})",
                target.limit
            )),
            Ok(Err(e)) if !format!("{e:#}").contains(target.names) => Some(format!(
                "an error that does not name {}: {e:#}",
                target.names
            )),
            Ok(Err(_)) => {
                refused += 1;
                None
            }
            Ok(Ok(())) => None,
        };
        if let Some(failure) = failure {
            let path = save.join(format!("{}-{i}.bin", target.name));
            std::fs::write(&path, &input).unwrap();
            return Err(format!(
                "{}: input {i} ({}) {failure}",
                target.name,
                path.display()
            ));
        }
    }
    Ok(refused)
}

/// One file of a directory replaced by the input, then `load` on the directory.
fn with_file(
    dir: &Path,
    file: &str,
    input: &[u8],
    load: impl FnOnce() -> Result<()>,
) -> Result<()> {
    std::fs::write(dir.join(file), input).unwrap();
    load()
}

#[test]
fn decoders_survive_mutated_input() {
    let tmp = TempDir::new("fuzz");
    let save = tmp.path().join("failures");
    std::fs::create_dir_all(&save).unwrap();

    // Coordinator frames, both directions.
    let mut worker_frames = Vec::new();
    for msg in [
        WorkerMsg::Hello {
            token: "0123456789abcdef".into(),
            protocol_version: 2,
        },
        WorkerMsg::Join(JoinRequest {
            host: "node-7".into(),
            collective_addr: "10.0.0.7:40123".into(),
            model_hash: "ab".repeat(32),
            dataset_hash: "cd".repeat(32),
            held_step: Some(1234),
        }),
        WorkerMsg::StepReport(StepMetrics {
            step: 9,
            loss: 7.5,
            ..Default::default()
        }),
        WorkerMsg::Bootstrap { blob: vec![7; 128] },
    ] {
        write_frame(&mut worker_frames, &msg).unwrap();
    }
    let job_text = std::fs::read_to_string("configs/tiny.toml").unwrap();
    let job =
        bertrain_coordinator::JobConfig::from_toml_str(&job_text, "job.toml", tmp.path(), &[])
            .unwrap();
    let mut coordinator_frames = Vec::new();
    for msg in [
        CoordinatorMsg::JobOffer {
            job: Box::new(job.clone()),
        },
        CoordinatorMsg::Stop {
            reason: "lost rank 1".into(),
            rejoin: true,
        },
    ] {
        write_frame(&mut coordinator_frames, &msg).unwrap();
    }
    fn read_all<T: serde::de::DeserializeOwned + bertrain_coordinator::protocol::Frame>(
        bytes: &[u8],
    ) -> Result<()> {
        let mut r = Cursor::new(bytes);
        while read_frame::<T>(&mut r)?.is_some() {}
        Ok(())
    }

    // Ring frames: three segments as a rank sends them, read into buffers of their size.
    let mut ring_frames = Vec::new();
    let mut sender = Framing::new(true);
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 64 + i * 32]).collect();
    for p in &payloads {
        sender.write(&mut ring_frames, p).unwrap();
    }
    let read_ring = |bytes: &[u8]| -> Result<()> {
        let mut r = Cursor::new(bytes);
        let mut receiver = Framing::new(true);
        for p in &payloads {
            receiver.read(&mut r, &mut vec![0; p.len()])?;
        }
        Ok(())
    };

    // A dataset made by dataprep: its manifest and first shard.
    let data = dataset().join("data");
    let manifest = Manifest::load(&data.join("manifest.json")).unwrap();
    let (shard_name, shard_rows) = (manifest.shards[0].file.clone(), manifest.shards[0].rows);
    let copy = tmp.path().join("data");
    std::fs::create_dir_all(&copy).unwrap();
    let shard_seed = std::fs::read(data.join(&shard_name)).unwrap();
    let manifest_seed = std::fs::read(data.join("manifest.json")).unwrap();
    let read_manifest = |bytes: &[u8]| {
        with_file(&copy, "manifest.json", bytes, || {
            Manifest::load(&copy.join("manifest.json")).map(drop)
        })
    };
    let read_shard = |bytes: &[u8]| {
        with_file(&copy, &shard_name, bytes, || {
            for row in read_rows(&copy.join(&shard_name), 0, shard_rows)? {
                row?;
            }
            Ok(())
        })
    };

    // The HF fixture: vocabulary and weights.
    let hf_dir = Path::new("tests/fixtures/hf-tiny-pretraining");
    let hf_copy = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_copy).unwrap();
    for file in [hf::CONFIG_FILE, hf::WEIGHTS_FILE, hf::VOCAB_FILE] {
        std::fs::copy(hf_dir.join(file), hf_copy.join(file)).unwrap();
    }
    let config = BertConfig::load(&hf_dir.join(hf::CONFIG_FILE)).unwrap();
    let layout = ParamLayout::of(&BertForPreTraining::<burn::backend::Flex>::new(
        &config,
        &Default::default(),
    ));
    let weights_seed = std::fs::read(hf_dir.join(hf::WEIGHTS_FILE)).unwrap();
    let vocab_seed = std::fs::read(hf_dir.join(hf::VOCAB_FILE)).unwrap();
    let read_weights = |bytes: &[u8]| {
        with_file(&hf_copy, hf::WEIGHTS_FILE, bytes, || {
            hf::load_dir(&hf_copy, &layout, 1).map(drop)
        })
    };
    let read_vocab = |bytes: &[u8]| {
        with_file(&hf_copy, hf::VOCAB_FILE, bytes, || {
            Vocab::load(&hf_copy.join(hf::VOCAB_FILE), None).map(drop)
        })
    };
    let read_job = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        bertrain_coordinator::JobConfig::from_toml_str(&text, "job.toml", tmp.path(), &[]).map(drop)
    };

    let targets = [
        Target {
            name: "worker-frames",
            seed: worker_frames,
            limit: MIB,
            decode: &read_all::<WorkerMsg>,
            names: "",
        },
        Target {
            name: "coordinator-frames",
            seed: coordinator_frames,
            limit: MIB,
            decode: &read_all::<CoordinatorMsg>,
            names: "",
        },
        Target {
            name: "ring-frames",
            seed: ring_frames,
            limit: 64 << 10,
            decode: &read_ring,
            names: "",
        },
        Target {
            name: "job-file",
            seed: job_text.into_bytes(),
            limit: MIB,
            decode: &read_job,
            names: "job.toml",
        },
        Target {
            name: "manifest",
            limit: MIB,
            seed: manifest_seed,
            decode: &read_manifest,
            names: "manifest.json",
        },
        Target {
            name: "parquet-shard",
            limit: 16 * MIB.max(shard_seed.len()),
            seed: shard_seed,
            decode: &read_shard,
            names: &shard_name,
        },
        Target {
            name: "vocab",
            limit: MIB,
            seed: vocab_seed,
            decode: &read_vocab,
            names: "vocab.txt",
        },
        Target {
            name: "safetensors",
            limit: 4 * (layout.total * 4).max(weights_seed.len()) + MIB,
            seed: weights_seed,
            decode: &read_weights,
            names: "model.safetensors",
        },
    ];

    let inputs = inputs_per_decoder();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let results: Vec<Result<usize, String>> =
        targets.iter().map(|t| fuzz(t, inputs, &save)).collect();
    std::panic::set_hook(quiet);
    let mut failures = Vec::new();
    for (target, r) in targets.iter().zip(results) {
        match r {
            Ok(refused) => eprintln!(
                "fuzz: {}: {inputs} mutated inputs, {refused} refused with an error, none panicked or over-allocated",
                target.name
            ),
            Err(f) => failures.push(f),
        }
    }
    if !failures.is_empty() {
        // Keep the failing inputs for whoever reads this.
        let kept = std::env::temp_dir().join("bertrain-fuzz-failures");
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::rename(&save, &kept).unwrap();
        panic!(
            "{}\n(inputs moved to {})",
            failures.join("\n"),
            kept.display()
        );
    }
}
