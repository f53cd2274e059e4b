//! Data loading: the job's [`DataPlan`] says which global samples this rank reads at each
//! step; this module reads them from the shards, collates micro-batches, and keeps a
//! bounded number of steps ready on a background thread so the training step never
//! waits for data that could have been read earlier.
//!
//! Shards are read a block at a time (`BLOCK_ROWS` rows, one sequential read through the
//! Parquet row groups); a step's samples come from one shuffle window of blocks, so a
//! small cache of decoded blocks serves every read. With length bins, the loader reads a
//! window's rows when the window's first step is due, to order the window by length.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::plan::{BLOCK_ROWS, DataPlan, SHUFFLE_WINDOW, SampleRef};
use anyhow::{Context, Result, bail};
use bertrain_coordinator::job::{JobConfig, TrainSection};
use bertrain_dataprep::{Instance, Manifest, read_rows};
use bertrain_model::BertConfig;

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
    /// What a row must be for the model to read it.
    limits: RowLimits,
    bins: Option<LengthBins>,
}

/// Length binning's state: steps of `global_batch` samples, and the last two windows in
/// their binned order.
struct LengthBins {
    global_batch: u64,
    windows: VecDeque<(Range<u64>, Vec<SampleRef>)>,
}

impl SampleSource {
    /// The samples of `manifest` in the order of `seed`, refusing rows that `model` cannot
    /// read (see [`RowLimits`]).
    pub fn new(manifest: Manifest, seed: u64, model: &BertConfig) -> Result<Self> {
        let rows: Vec<u64> = manifest.shards.iter().map(|s| s.rows).collect();
        let plan = DataPlan::new(&rows, seed)?;
        Ok(SampleSource {
            manifest,
            plan,
            cache: HashMap::new(),
            recent: VecDeque::new(),
            limits: RowLimits {
                positions: model.max_position_embeddings,
                vocab_size: model.vocab_size,
                type_vocab_size: model.type_vocab_size,
            },
            bins: None,
        })
    }

    /// The training set as the job reads it: its seed, and length bins when `[data]` asks
    /// for them (or by default, see `DataSection::length_bins_for`).
    pub fn for_training(manifest: Manifest, job: &JobConfig, model: &BertConfig) -> Result<Self> {
        let bins = job.data.length_bins_for(manifest.max_seq_len);
        let source = SampleSource::new(manifest, job.train.seed, model)?;
        Ok(match bins {
            true => source.with_length_bins(job.train.global_batch_size),
            false => source,
        })
    }

    /// Reads each window in length bins for steps of `global_batch` samples (see
    /// `DataPlan::length_binned`).
    pub fn with_length_bins(mut self, global_batch: u64) -> Self {
        self.bins = Some(LengthBins {
            global_batch,
            windows: VecDeque::new(),
        });
        self
    }

    pub fn plan(&self) -> &DataPlan {
        &self.plan
    }

    /// Where global samples `range` live, in reading order: the plan's, or with length
    /// bins each window's binned order (which reads the window's rows to learn their
    /// lengths; the block cache keeps them for the steps that follow).
    pub fn samples(&mut self, range: Range<u64>) -> Result<Vec<SampleRef>> {
        if self.bins.is_none() {
            return Ok(self.plan.samples(range));
        }
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for g in range {
            let window = self.plan.window_of(g);
            let binned = match self.binned_window(&window) {
                Some(binned) => binned,
                None => {
                    let plan_order = self.plan.samples(window.clone());
                    let mut lengths = Vec::with_capacity(plan_order.len());
                    for sample in &plan_order {
                        lengths.push(self.instance(sample)?.input_ids.len() as u32);
                    }
                    let Some(bins) = &mut self.bins else {
                        unreachable!("checked above")
                    };
                    let order =
                        self.plan
                            .length_binned(window.clone(), &lengths, bins.global_batch);
                    let binned = order.iter().map(|&i| plan_order[i as usize]).collect();
                    if bins.windows.len() == 2 {
                        bins.windows.pop_front();
                    }
                    bins.windows.push_back((window.clone(), binned));
                    self.binned_window(&window).expect("just added")
                }
            };
            out.push(binned[(g - window.start) as usize]);
        }
        Ok(out)
    }

    fn binned_window(&self, window: &Range<u64>) -> Option<&Vec<SampleRef>> {
        let bins = self.bins.as_ref()?;
        bins.windows
            .iter()
            .find(|(w, _)| w == window)
            .map(|(_, samples)| samples)
    }

    /// The instances at `samples`, in order.
    pub fn read(&mut self, samples: &[SampleRef]) -> Result<Vec<Instance>> {
        let mut out = Vec::with_capacity(samples.len());
        for sample in samples {
            out.push(self.instance(sample)?.clone());
        }
        Ok(out)
    }

    fn instance(&mut self, sample: &SampleRef) -> Result<&Instance> {
        let block = sample.row / BLOCK_ROWS;
        let rows = self.block(sample.shard, block)?;
        Ok(&rows[(sample.row - block * BLOCK_ROWS) as usize])
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
            if let Some((i, problem)) = rows
                .iter()
                .enumerate()
                .find_map(|(i, r)| self.limits.check(r).map(|p| (i, p)))
            {
                bail!(
                    "dataset {}: row {} of shard {} {problem}",
                    self.manifest.dir().display(),
                    start + i as u64,
                    entry.file,
                );
            }
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

/// What a row must be for the model to read it. Rows that dataprep writes always are; a
/// row that is not (a dataset written by another tool) is refused with what is wrong,
/// instead of reaching an embedding or a gather, which would panic on the CPU and read out
/// of bounds on a GPU (the unpadded encoder's gathers also need distinct positions).
#[derive(Debug, Clone, Copy)]
struct RowLimits {
    positions: usize,
    vocab_size: usize,
    type_vocab_size: usize,
}

impl RowLimits {
    /// What is wrong with `row`, if anything, said after "row R of shard F".
    fn check(&self, row: &Instance) -> Option<String> {
        let len = row.input_ids.len();
        if len > self.positions {
            return Some(format!(
                "has {len} tokens, more than the model's {} positions (max_position_embeddings); \
                 remake the dataset with --max-seq-len {} or use a model with more positions",
                self.positions, self.positions
            ));
        }
        let problem = if len == 0 {
            "is empty".to_string()
        } else if row.token_type_ids.len() != len {
            format!(
                "has {len} token ids but {} segment ids",
                row.token_type_ids.len()
            )
        } else if let Some(id) = row
            .input_ids
            .iter()
            .chain(&row.masked_lm_ids)
            .find(|&&id| id as usize >= self.vocab_size)
        {
            format!(
                "holds token id {id}, outside the model's vocabulary of {}",
                self.vocab_size
            )
        } else if let Some(t) = row
            .token_type_ids
            .iter()
            .find(|&&t| t as usize >= self.type_vocab_size)
        {
            format!(
                "holds segment id {t}; the model has {} segments",
                self.type_vocab_size
            )
        } else if row.masked_lm_positions.is_empty()
            || row.masked_lm_positions.len() != row.masked_lm_ids.len()
        {
            format!(
                "has {} masked positions and {} masked ids (at least one of each, as many of one as of the other)",
                row.masked_lm_positions.len(),
                row.masked_lm_ids.len()
            )
        } else if !row.masked_lm_positions.windows(2).all(|w| w[0] < w[1])
            || row
                .masked_lm_positions
                .last()
                .is_some_and(|&p| p as usize >= len)
        {
            format!(
                "has masked positions {:?}, which must be ascending and below its length {len}",
                row.masked_lm_positions
            )
        } else if row.next_sentence_label > 1 {
            format!(
                "has next-sentence label {}, not 0 or 1",
                row.next_sentence_label
            )
        } else {
            return None;
        };
        Some(problem + "; remake the dataset with `bertrain dataprep`")
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
    let first_row = range.start - step * shape.global_batch;
    let samples = source.samples(range)?;
    let instances = source.read(&samples)?;
    let micro_batches = instances
        .chunks(shape.micro_batch)
        .enumerate()
        .map(|(i, rows)| HostBatch {
            first_row: first_row + (i * shape.micro_batch) as u64,
            ..HostBatch::collate(rows)
        })
        .collect();
    Ok(StepData {
        step,
        samples,
        micro_batches,
    })
}

/// With `BERTRAIN_TRACE_SAMPLES=DIR`, every rank appends `step shard row generation` for
/// each sample it trains on to `DIR/samples-<pid>.txt`: how the tests check that a resumed
/// or elastic epoch uses every sample exactly once (a step a lost generation began and the
/// next one did again counts once, in the later generation). Off (and free) otherwise.
pub(crate) struct SampleTrace {
    file: std::fs::File,
    generation: u64,
}

impl SampleTrace {
    pub fn from_env(rank: usize, generation: u64) -> Result<Option<SampleTrace>> {
        let Some(dir) = std::env::var_os("BERTRAIN_TRACE_SAMPLES") else {
            return Ok(None);
        };
        let path = Path::new(&dir).join(format!("samples-{}.txt", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("BERTRAIN_TRACE_SAMPLES: cannot open {}", path.display()))?;
        tracing::debug!(rank, path = %path.display(), "tracing samples");
        Ok(Some(SampleTrace { file, generation }))
    }

    pub fn record(&self, step: u64, samples: &[SampleRef]) -> Result<()> {
        use std::io::Write;
        let mut text = String::new();
        for s in samples {
            text += &format!("{step} {} {} {}\n", s.shard, s.row, self.generation);
        }
        (&self.file)
            .write_all(text.as_bytes())
            .context("BERTRAIN_TRACE_SAMPLES: write failed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way a row can be unreadable for the model is named; a good row passes.
    #[test]
    fn rows_the_model_cannot_read_are_named() {
        let limits = RowLimits {
            positions: 8,
            vocab_size: 100,
            type_vocab_size: 2,
        };
        let good = Instance {
            input_ids: vec![2, 50, 3, 60, 3],
            token_type_ids: vec![0, 0, 0, 1, 1],
            masked_lm_positions: vec![1, 3],
            masked_lm_ids: vec![51, 61],
            next_sentence_label: 1,
        };
        assert_eq!(limits.check(&good), None);
        let bad = |change: fn(&mut Instance)| {
            let mut row = good.clone();
            change(&mut row);
            limits.check(&row).expect("refused")
        };
        let cases: [(fn(&mut Instance), &str); 8] = [
            (
                |r| r.input_ids = vec![1; 9],
                "9 tokens, more than the model's 8 positions",
            ),
            (|r| r.input_ids.clear(), "is empty"),
            (
                |r| {
                    r.token_type_ids.pop();
                },
                "5 token ids but 4 segment ids",
            ),
            (
                |r| r.masked_lm_ids[1] = 100,
                "token id 100, outside the model's vocabulary of 100",
            ),
            (|r| r.token_type_ids[4] = 2, "segment id 2"),
            (
                |r| {
                    r.masked_lm_ids.pop();
                },
                "2 masked positions and 1 masked ids",
            ),
            (|r| r.masked_lm_positions = vec![3, 3], "must be ascending"),
            (|r| r.next_sentence_label = 2, "next-sentence label 2"),
        ];
        for (change, expected) in cases {
            let problem = bad(change);
            assert!(problem.contains(expected), "{problem}");
        }
        let past_the_end = bad(|r| r.masked_lm_positions = vec![1, 5]);
        assert!(
            past_the_end.contains("below its length 5"),
            "{past_the_end}"
        );
    }
}
