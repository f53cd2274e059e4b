//! The data order: which sample every rank reads at every step.
//!
//! This is the contract exact and elastic resume rest on, so it is a pure function of
//! (shard sizes, seed) and the global sample counter:
//! - the rows of all shards, in manifest order, are cut into blocks of [`BLOCK_ROWS`];
//! - epoch `e` permutes the blocks with `Rng(seed, e)`, giving the epoch stream of
//!   `N = total_rows` samples (blocks keep reads sequential inside a shard);
//! - the stream is cut into windows of [`SHUFFLE_WINDOW`] blocks, and positions inside
//!   window `w` are permuted with `Rng(seed, e, w)` (so a batch mixes 16 blocks);
//! - global sample `g` (counted from the job's start) is epoch `g / N`, position `g % N`;
//! - optimizer step `s` consumes samples `[s*G, (s+1)*G)`; rank `r` of `W` takes the
//!   contiguous slice `[s*G + r*G/W, s*G + (r+1)*G/W)`.
//!
//! A run's data position is therefore just its step: resume is O(1), and resuming at
//! another world size with the same `G` uses every remaining sample of the epoch once.
//!
//! With length bins (`[data] length_bins`, see [`DataPlan::length_binned`]) each window is
//! reordered once more by its rows' lengths, so that a step's sequences are of about one
//! length and attention pads little. That order is a function of the window's rows, so
//! it too is the same for every world size and for a resumed run.

use std::ops::Range;

use anyhow::{Result, bail};

/// Rows per block: the unit of the epoch-level shuffle.
pub const BLOCK_ROWS: u64 = 1024;
/// Blocks per window: positions are shuffled inside a window of this many blocks.
pub const SHUFFLE_WINDOW: u64 = 16;
const WINDOW_ROWS: u64 = BLOCK_ROWS * SHUFFLE_WINDOW;
/// Keeps the run shuffle's random stream apart from the windows' (`Rng(seed, epoch, w)`).
const LENGTH_BINS_STREAM: u64 = 0x6c65_6e67_7468_7321;

/// Where one sample lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef {
    /// Index of the shard in the manifest.
    pub shard: usize,
    /// Row inside that shard.
    pub row: u64,
}

/// The job's data order over a dataset of shards with the given row counts.
#[derive(Debug, Clone)]
pub struct DataPlan {
    /// `shard_starts[i]` is the global row index of shard `i`'s first row; the last entry is N.
    shard_starts: Vec<u64>,
    seed: u64,
}

impl DataPlan {
    pub fn new(shard_rows: &[u64], seed: u64) -> Result<DataPlan> {
        let mut shard_starts = Vec::with_capacity(shard_rows.len() + 1);
        let mut total = 0u64;
        shard_starts.push(0);
        for &rows in shard_rows {
            total = total
                .checked_add(rows)
                .ok_or_else(|| anyhow::anyhow!("dataset row count overflows u64"))?;
            shard_starts.push(total);
        }
        if total == 0 {
            bail!("the dataset has no rows");
        }
        Ok(DataPlan { shard_starts, seed })
    }

    /// Samples in one epoch.
    pub fn total_rows(&self) -> u64 {
        *self.shard_starts.last().unwrap_or(&0)
    }

    /// The epoch that global sample `g` belongs to.
    pub fn epoch_of(&self, g: u64) -> u64 {
        g / self.total_rows()
    }

    /// The global samples rank `rank` of `world` consumes at optimizer step `step`.
    /// `global_batch` must be divisible by `world` (the job config guarantees it).
    pub fn rank_slice(
        &self,
        step: u64,
        rank: usize,
        world: usize,
        global_batch: u64,
    ) -> Range<u64> {
        let per_rank = global_batch / world as u64;
        let start = step * global_batch + rank as u64 * per_rank;
        start..start + per_rank
    }

    /// Where global sample `g` lives. For many samples use [`DataPlan::samples`], which
    /// computes each permutation once instead of once per sample.
    pub fn sample(&self, g: u64) -> SampleRef {
        self.samples(g..g + 1)[0]
    }

    /// Where each global sample in `range` lives, in order.
    pub fn samples(&self, range: Range<u64>) -> Vec<SampleRef> {
        let n = self.total_rows();
        let mut out = Vec::with_capacity(range.end.saturating_sub(range.start) as usize);
        let mut epoch_order: Option<(u64, EpochOrder)> = None;
        let mut window: Option<((u64, u64), Vec<u32>)> = None;
        for g in range {
            let epoch = g / n;
            let pos = g % n;
            if epoch_order.as_ref().is_some_and(|(e, _)| *e != epoch) {
                epoch_order = None;
            }
            let (_, order) =
                epoch_order.get_or_insert_with(|| (epoch, EpochOrder::new(n, self.seed, epoch)));
            let w = pos / WINDOW_ROWS;
            if window.as_ref().is_some_and(|(key, _)| *key != (epoch, w)) {
                window = None;
            }
            let (_, perm) = window.get_or_insert_with(|| {
                let len = (n - w * WINDOW_ROWS).min(WINDOW_ROWS);
                let mut rng = Rng::from_parts(&[self.seed, epoch, w]);
                ((epoch, w), permutation(len, &mut rng))
            });
            let stream_pos = w * WINDOW_ROWS + u64::from(perm[(pos - w * WINDOW_ROWS) as usize]);
            let row = order.global_row(stream_pos);
            out.push(self.locate(row));
        }
        out
    }

    /// The global samples of the shuffle window that holds global sample `g` (a window
    /// ends at its epoch's end).
    pub fn window_of(&self, g: u64) -> Range<u64> {
        let n = self.total_rows();
        let epoch_start = g / n * n;
        let start = epoch_start + (g - epoch_start) / WINDOW_ROWS * WINDOW_ROWS;
        start..(start + WINDOW_ROWS).min(epoch_start + n)
    }

    /// Length binning of the window `window` (from [`DataPlan::window_of`]) whose samples,
    /// in plan order, hold `lengths[i]` tokens: the window's samples in the order to read
    /// them, as indices into `lengths`.
    ///
    /// The samples are sorted by length (equal lengths keep the plan's shuffled order) and
    /// cut into runs at the window's step boundaries (global samples that are multiples of
    /// `global_batch`); the whole runs are then shuffled with `Rng(seed, window start)`,
    /// while a partial run at either end of the window stays there. So a step's
    /// sequences have about one length, and which length comes next is random.
    pub fn length_binned(
        &self,
        window: Range<u64>,
        lengths: &[u32],
        global_batch: u64,
    ) -> Vec<u32> {
        let len = window.end - window.start;
        assert_eq!(
            lengths.len() as u64,
            len,
            "one length per sample of the window"
        );
        let mut by_length: Vec<u32> = (0..len as u32).collect();
        by_length.sort_by_key(|&i| lengths[i as usize]);
        let head = ((global_batch - window.start % global_batch) % global_batch).min(len);
        let whole = (len - head) / global_batch;
        let (head_rows, rest) = by_length.split_at(head as usize);
        let (runs, tail_rows) = rest.split_at((whole * global_batch) as usize);
        let runs: Vec<&[u32]> = runs.chunks(global_batch as usize).collect();
        let mut rng = Rng::from_parts(&[self.seed, window.start, LENGTH_BINS_STREAM]);
        let order = permutation(runs.len() as u64, &mut rng);
        let mut out = head_rows.to_vec();
        out.extend(order.iter().flat_map(|&r| runs[r as usize].iter().copied()));
        out.extend_from_slice(tail_rows);
        out
    }

    fn locate(&self, global_row: u64) -> SampleRef {
        // partition_point gives the first shard starting after the row.
        let shard = self.shard_starts.partition_point(|&s| s <= global_row) - 1;
        SampleRef {
            shard,
            row: global_row - self.shard_starts[shard],
        }
    }
}

/// One epoch's block permutation, and where the one short block (if any) landed in it.
struct EpochOrder {
    blocks: Vec<u32>,
    /// Position in `blocks` of the last (possibly shorter) block, and its length.
    short_at: usize,
    short_len: u64,
}

impl EpochOrder {
    fn new(total_rows: u64, seed: u64, epoch: u64) -> EpochOrder {
        let num_blocks = total_rows.div_ceil(BLOCK_ROWS);
        let mut rng = Rng::from_parts(&[seed, epoch]);
        let blocks = permutation(num_blocks, &mut rng);
        let last = (num_blocks - 1) as u32;
        let short_at = blocks.iter().position(|&b| b == last).unwrap_or(0);
        let short_len = total_rows - u64::from(last) * BLOCK_ROWS;
        EpochOrder {
            blocks,
            short_at,
            short_len,
        }
    }

    /// The dataset row at position `p` of the epoch stream.
    fn global_row(&self, p: u64) -> u64 {
        let short_start = self.short_at as u64 * BLOCK_ROWS;
        let (index, offset) = if p < short_start {
            ((p / BLOCK_ROWS) as usize, p % BLOCK_ROWS)
        } else if p < short_start + self.short_len {
            (self.short_at, p - short_start)
        } else {
            let after = p - short_start - self.short_len;
            (
                self.short_at + 1 + (after / BLOCK_ROWS) as usize,
                after % BLOCK_ROWS,
            )
        };
        u64::from(self.blocks[index]) * BLOCK_ROWS + offset
    }
}

/// Fisher-Yates permutation of `0..len`. Indices fit u32: a window is 16 Ki rows, and
/// 4 Gi blocks of 1 Ki rows would be 4 Ti samples.
fn permutation(len: u64, rng: &mut Rng) -> Vec<u32> {
    let mut v: Vec<u32> = (0..len as u32).collect();
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// SplitMix64: tiny, fast, and its stream is fixed forever (unlike library RNGs whose
/// output may change between versions, which would silently change the data order).
struct Rng(u64);

impl Rng {
    fn from_parts(parts: &[u64]) -> Rng {
        let mut state = 0x6a09_e667_f3bc_c909u64;
        for &p in parts {
            state = Rng(state ^ p).next();
        }
        Rng(state)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn all_rows(shard_rows: &[u64]) -> BTreeSet<SampleRef> {
        let mut out = BTreeSet::new();
        for (shard, &rows) in shard_rows.iter().enumerate() {
            for row in 0..rows {
                out.insert(SampleRef { shard, row });
            }
        }
        out
    }

    #[test]
    fn one_epoch_is_every_row_once() {
        // Shards of odd sizes so blocks straddle shard boundaries and the last block is short.
        let shards = [5000, 1, 30_000, 777];
        let plan = DataPlan::new(&shards, 7).unwrap();
        let n = plan.total_rows();
        for epoch in 0..2 {
            let got = plan.samples(epoch * n..(epoch + 1) * n);
            let set: BTreeSet<_> = got.iter().copied().collect();
            assert_eq!(got.len() as u64, n);
            assert_eq!(set, all_rows(&shards));
        }
        // A different epoch is a different order.
        assert_ne!(plan.samples(0..100), plan.samples(n..n + 100));
    }

    #[test]
    fn deterministic_and_seeded() {
        let a = DataPlan::new(&[40_000], 1).unwrap();
        let b = DataPlan::new(&[40_000], 1).unwrap();
        let c = DataPlan::new(&[40_000], 2).unwrap();
        assert_eq!(a.samples(0..40_000), b.samples(0..40_000));
        assert_ne!(a.samples(0..1000), c.samples(0..1000));
        // Single lookups agree with range lookups.
        let range = a.samples(30_000..30_050);
        for (i, s) in range.iter().enumerate() {
            assert_eq!(a.sample(30_000 + i as u64), *s);
        }
        // Actually shuffled, not the identity.
        let first: Vec<u64> = a.samples(0..64).iter().map(|s| s.row).collect();
        assert_ne!(first, (0..64).collect::<Vec<_>>());
    }

    /// Rank slices over the epoch: every sample once, for any world size, including a
    /// world size change in the middle of the epoch (elastic resume).
    #[test]
    fn rank_slices_cover_the_epoch_once_even_when_world_size_changes() {
        let shards = [3000, 2000, 1192]; // N = 6192, G = 48 -> 129 steps exactly
        let plan = DataPlan::new(&shards, 3).unwrap();
        let g = 48u64;
        let steps = plan.total_rows() / g;
        for schedule in [
            vec![(0, 1)],
            vec![(0, 2)],
            vec![(0, 3)],
            vec![(0, 4), (50, 2), (77, 3), (100, 1)],
        ] {
            let mut seen = Vec::new();
            for step in 0..steps {
                let world = schedule
                    .iter()
                    .rev()
                    .find(|(from, _)| step >= *from)
                    .unwrap()
                    .1;
                for rank in 0..world {
                    let slice = plan.rank_slice(step, rank, world, g);
                    assert_eq!(slice.end - slice.start, g / world as u64);
                    seen.extend(plan.samples(slice));
                }
            }
            let set: BTreeSet<_> = seen.iter().copied().collect();
            assert_eq!(seen.len() as u64, plan.total_rows(), "{schedule:?}");
            assert_eq!(set, all_rows(&shards), "{schedule:?}");
        }
    }

    #[test]
    fn epoch_boundary_inside_a_batch() {
        let plan = DataPlan::new(&[100], 9).unwrap();
        // Step 3 with G = 32 takes samples 96..128: 4 from epoch 0, 28 from epoch 1.
        let slice = plan.rank_slice(3, 0, 1, 32);
        assert_eq!(plan.epoch_of(slice.start), 0);
        assert_eq!(plan.epoch_of(slice.end - 1), 1);
        // Compared as sorted lists, not sets: a row may occur once in each epoch's part.
        let mut got = plan.samples(slice);
        let mut want: Vec<_> = plan.samples(0..100).into_iter().skip(96).collect();
        want.extend(plan.samples(100..200).into_iter().take(28));
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    /// Binning reorders each window alone: every sample of the window once, whole steps
    /// of one length band (here lengths are the row numbers, so a step's spread shows),
    /// partial runs kept at the window's ends, and a seeded, non-monotone run order.
    #[test]
    fn length_bins_make_steps_of_one_length_in_random_order() {
        let plan = DataPlan::new(&[40_000], 5).unwrap();
        let g = 48;
        for start in [0, WINDOW_ROWS, 2 * WINDOW_ROWS] {
            let window = plan.window_of(start + 7);
            assert_eq!(window.start, start);
            let lengths: Vec<u32> = plan
                .samples(window.clone())
                .iter()
                .map(|s| (s.row % 500) as u32)
                .collect();
            let order = plan.length_binned(window.clone(), &lengths, g);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, (0..lengths.len() as u32).collect::<Vec<_>>());
            // Steps inside the window: global samples [k*g, (k+1)*g).
            let first_step = window.start.div_ceil(g);
            let mut means = Vec::new();
            for k in first_step..window.end / g {
                let at = |gs: u64| lengths[order[(gs - window.start) as usize] as usize];
                let step: Vec<u32> = (k * g..(k + 1) * g).map(at).collect();
                let spread = step.iter().max().unwrap() - step.iter().min().unwrap();
                assert!(spread <= 10, "step {k} spans lengths {spread} apart");
                means.push(step.iter().sum::<u32>() / g as u32);
            }
            assert!(means.windows(2).any(|w| w[0] > w[1]), "runs are shuffled");
            assert!(means.windows(2).any(|w| w[0] < w[1]), "runs are shuffled");
        }
        // The last window of the epoch is short and ends at the epoch's end.
        assert_eq!(plan.window_of(39_999), 2 * WINDOW_ROWS..40_000);
        assert_eq!(plan.window_of(40_000), 40_000..40_000 + WINDOW_ROWS);
    }

    #[test]
    fn rng_below_is_in_range() {
        let mut rng = Rng::from_parts(&[1, 2, 3]);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(rng.below(n) < n);
            }
        }
    }

    #[test]
    fn empty_dataset_is_an_error() {
        assert!(DataPlan::new(&[], 1).is_err());
        assert!(DataPlan::new(&[0, 0], 1).is_err());
    }
}
