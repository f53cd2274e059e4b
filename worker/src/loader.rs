//! Data loading: the job's [`DataPlan`] says which global samples this rank reads at each
//! step; this module reads them from the shards, collates micro-batches, and keeps a
//! bounded number of steps ready on a background thread so the training step never
//! waits for data that could have been read earlier.
//!
//! Shards are read a block at a time (`BLOCK_ROWS` rows, one sequential read through the
//! Parquet row groups); a step's samples come from one shuffle window of blocks, so a
//! small cache of decoded blocks serves every read.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use bertrain_coordinator::job::TrainSection;
use bertrain_coordinator::plan::{BLOCK_ROWS, DataPlan, SHUFFLE_WINDOW, SampleRef};
use bertrain_dataprep::{Instance, Manifest, read_rows};

use crate::batch::HostBatch;

/// Decoded blocks kept in memory: two shuffle windows, so a step spanning a window
/// boundary finds both.
const CACHED_BLOCKS: usize = 2 * SHUFFLE_WINDOW as usize;

/// Reads global samples of a dataset in the plan's order.
pub struct SampleSource {
    manifest: Manifest,
    plan: DataPlan,
    cache: HashMap<(usize, u64), Vec<Instance>>,
    recent: VecDeque<(usize, u64)>,
}

impl SampleSource {
    pub fn new(manifest: Manifest, seed: u64) -> Result<Self> {
        let rows: Vec<u64> = manifest.shards.iter().map(|s| s.rows).collect();
        let plan = DataPlan::new(&rows, seed)?;
        Ok(SampleSource {
            manifest,
            plan,
            cache: HashMap::new(),
            recent: VecDeque::new(),
        })
    }

    pub fn plan(&self) -> &DataPlan {
        &self.plan
    }

    /// The instances at `samples`, in order.
    pub fn read(&mut self, samples: &[SampleRef]) -> Result<Vec<Instance>> {
        let mut out = Vec::with_capacity(samples.len());
        for sample in samples {
            let block = sample.row / BLOCK_ROWS;
            let rows = self.block(sample.shard, block)?;
            out.push(rows[(sample.row - block * BLOCK_ROWS) as usize].clone());
        }
        Ok(out)
    }

    fn block(&mut self, shard: usize, block: u64) -> Result<&Vec<Instance>> {
        let key = (shard, block);
        if !self.cache.contains_key(&key) {
            let entry = &self.manifest.shards[shard];
            let path = self.manifest.shard_path(entry);
            let start = block * BLOCK_ROWS;
            let end = (start + BLOCK_ROWS).min(entry.rows);
            let rows = read_rows(&path, start, end)?
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("reading rows {start}..{end} of {}", path.display()))?;
            if self.recent.len() == CACHED_BLOCKS
                && let Some(old) = self.recent.pop_front()
            {
                self.cache.remove(&old);
            }
            self.recent.push_back(key);
            self.cache.insert(key, rows);
        }
        Ok(&self.cache[&key])
    }
}

/// What the trainer needs to know to cut its slice of each step into micro-batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchShape {
    pub global_batch: u64,
    pub micro_batch: usize,
    pub rank: usize,
    pub world: usize,
}

impl BatchShape {
    /// Rank `rank` of `world`'s share of each step of the job's `[train]` batch.
    pub fn from_job(t: &TrainSection, rank: usize, world: usize) -> BatchShape {
        BatchShape {
            global_batch: t.global_batch_size,
            micro_batch: t.micro_batch_size as usize,
            rank,
            world,
        }
    }
}

/// One step's micro-batches for this rank, with the time spent producing them.
pub struct StepData {
    pub step: u64,
    /// Where this rank's samples of the step live, in order.
    pub samples: Vec<SampleRef>,
    pub micro_batches: Vec<HostBatch>,
}

/// Produces [`StepData`] for consecutive steps on a background thread, at most
/// `prefetch` steps ahead.
pub struct Prefetcher {
    receiver: Receiver<Result<StepData>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(
        mut source: SampleSource,
        shape: BatchShape,
        first_step: u64,
        prefetch: usize,
    ) -> Self {
        let (sender, receiver) = sync_channel(prefetch.max(1));
        let thread = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || produce(&mut source, shape, first_step, sender))
            .expect("spawning the loader thread");
        Prefetcher {
            receiver,
            thread: Some(thread),
        }
    }

    /// The next step's data, waiting for it if the loader is behind.
    pub fn next(&self) -> Result<StepData> {
        self.receiver
            .recv()
            .map_err(|_| anyhow::anyhow!("the data loader stopped"))?
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel makes the loader's next send fail, which ends it.
        let (_, dead) = sync_channel(1);
        drop(std::mem::replace(&mut self.receiver, dead));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn produce(
    source: &mut SampleSource,
    shape: BatchShape,
    first_step: u64,
    sender: SyncSender<Result<StepData>>,
) {
    for step in first_step.. {
        let data = step_data(source, shape, step);
        let failed = data.is_err();
        if sender.send(data).is_err() || failed {
            return;
        }
    }
}

/// This rank's micro-batches of `step`.
pub fn step_data(source: &mut SampleSource, shape: BatchShape, step: u64) -> Result<StepData> {
    let range = source
        .plan()
        .rank_slice(step, shape.rank, shape.world, shape.global_batch);
    let samples = source.plan().samples(range);
    let instances = source.read(&samples)?;
    let micro_batches = instances
        .chunks(shape.micro_batch)
        .map(HostBatch::collate)
        .collect();
    Ok(StepData {
        step,
        samples,
        micro_batches,
    })
}
