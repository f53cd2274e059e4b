//! Dropout whose masks are keyed by what each row is, drawn on the host on CPU backends
//! and by the backend's own kernel on a GPU.
//!
//! burn's `Dropout` samples a Bernoulli mask element by element through a ChaCha
//! generator, then multiplies twice (mask, then 1/keep): about 10% of a CPU training step
//! of the mini model. On a CPU backend the tensor lives in host memory anyway, so here the
//! mask is made directly as `0` or `1/keep` from SplitMix64 streams, four 16-bit draws per
//! 64-bit output, and applied with one multiply. A GPU backend draws the same mask in a
//! kernel ([`DropoutOps`], with `BERTRAIN_KERNELS=fused`): one pass instead of burn's
//! five, no mask kept for the backward (it is drawn again), and the CPU's masks bit for
//! bit; or inside the attention softmax and residual + LayerNorm kernels ([`KeyedMask`]),
//! no pass of its own. Otherwise burn's own dropout runs there.
//!
//! A tensor's mask is drawn row by row (a row is its last dimension), each row from a
//! stream of its own keyed by what the row is ([`RowKeys`]): (sequence, position) for
//! hidden states, (sequence, head, query) for attention probabilities, where the sequence
//! is counted in the step's global batch. So the padded and the unpadded encoder, which
//! hold the same token in different rows, drop the same units of it, and a sequence gets
//! the same masks whichever rank and micro-batch it falls in: a step's result does not
//! depend on the world size beyond the order of sums (what an elastic job relies on).
//! Each call takes one value from a per-thread stream that [`seed_dropout`] sets, which the
//! trainer does once per micro-batch with a (seed, step) seed: a step's masks are a
//! function of it, so resumed runs repeat it bit for bit. The drop probability is rounded
//! to a multiple of 1/65536 (0.1 becomes 0.100006).
//!
//! Row `r`'s mask: with `s = splitmix64(call ^ key(r) · KEY_MULTIPLIER)` (one SplitMix64
//! step from that state), its 64-bit draw `j` is `mix(s + (j + 1) · GAMMA)`, whose four
//! 16-bit lanes (lowest first) decide elements `4j` to `4j + 3`: dropped where the lane is
//! below `prob · 65536`.

use std::cell::Cell;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::nn::Dropout;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::TensorMetadata;
use burn::tensor::ops::{FloatTensor, IntTensor};

/// SplitMix64's increment.
pub(crate) const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// What a row's key is multiplied by before it is mixed with the call's value.
pub(crate) const KEY_MULTIPLIER: u64 = 0xD6E8_FEB8_6659_FD93;

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0x5EED_D50F_0000_0001) };
    static FIRST_SEQUENCE: Cell<u64> = const { Cell::new(0) };
}

/// Restarts this thread's mask stream from `seed`, for a batch whose first sequence is
/// sequence `first_sequence` of the step's global batch.
pub fn seed_dropout(seed: u64, first_sequence: u64) {
    STATE.with(|s| s.set(seed));
    FIRST_SEQUENCE.with(|f| f.set(first_sequence));
}

/// Where the keys of the batch's sequences start (see [`seed_dropout`]).
pub(crate) fn first_sequence() -> u64 {
    FIRST_SEQUENCE.with(Cell::get)
}

/// The next value of this thread's stream: one per dropout call.
fn next_call() -> u64 {
    STATE.with(|s| {
        let mut state = s.get();
        let call = splitmix64(&mut state);
        s.set(state);
        call
    })
}

/// The keys of a tensor's rows. Row `r` is position `f` of a grid of `seq` columns, where
/// `f = r` or, for a listed set of rows, `f = positions[r]`; its key is
/// `(first + f / seq) << 32 | (f % seq + offset)` (wrapping in 32 bits).
#[derive(Clone, Debug)]
pub struct RowKeys<B: Backend> {
    first: u64,
    seq: u32,
    offset: u32,
    positions: Option<Positions<B>>,
}

/// Listed rows' grid positions, on the host (host masks) and on the device (kernels).
#[derive(Clone, Debug)]
struct Positions<B: Backend> {
    host: Arc<[u32]>,
    device: IntTensor<B>,
}

impl<B: Backend> RowKeys<B> {
    /// Rows that are the grid's positions in order, from its row `first`.
    pub fn grid(first: u64, seq: usize) -> Self {
        Self {
            first,
            seq: seq as u32,
            offset: 0,
            positions: None,
        }
    }

    /// Rows at the given `positions` of the grid (`device` holds the same values).
    pub fn listed(first: u64, seq: usize, positions: &[u32], device: Tensor<B, 1, Int>) -> Self {
        Self {
            positions: Some(Positions {
                host: positions.into(),
                device: device.into_primitive(),
            }),
            ..Self::grid(first, seq)
        }
    }

    /// The same rows with `offset` added to every key's position.
    pub fn with_offset(self, offset: u32) -> Self {
        Self { offset, ..self }
    }

    /// The keys of the first `rows` rows.
    fn host_keys(&self, rows: usize) -> Vec<u64> {
        let key = |f: u64| {
            let seq = u64::from(self.seq);
            (self.first.wrapping_add(f / seq) << 32)
                | u64::from(((f % seq) as u32).wrapping_add(self.offset))
        };
        match &self.positions {
            Some(p) => p.host[..rows].iter().map(|&f| key(u64::from(f))).collect(),
            None => (0..rows as u64).map(key).collect(),
        }
    }

    /// What a kernel needs: `(first, seq, offset, positions)` (see the type's docs).
    #[cfg(feature = "cube")]
    pub(crate) fn parts(&self) -> (u64, u32, u32, Option<&IntTensor<B>>) {
        let positions = self.positions.as_ref().map(|p| &p.device);
        (self.first, self.seq, self.offset, positions)
    }
}

/// `dropout` applied to `x`, whose rows (last dimension) are identified by `keys`: the
/// identity outside training (no autodiff) or at probability 0, host-drawn masks on CPU
/// backends, the backend's keyed kernel where it has one switched on, burn's dropout
/// elsewhere (which ignores the keys).
pub(crate) fn apply<B: DropoutOps, const D: usize>(
    dropout: &Dropout,
    x: Tensor<B, D>,
    keys: &RowKeys<B>,
) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || dropout.prob == 0.0 {
        return x;
    }
    if computes_on_host::<B>(&device) {
        // burn's autodiff of a product with a constant: the mask is kept for the backward.
        let shape = x.shape();
        let mask = host_mask(x.shape(), keys, next_call(), dropout.prob);
        return x * Tensor::<B, D>::from_data(TensorData::new(mask, shape), &device);
    }
    if B::keyed_dropout_kernel() {
        let y = B::keyed_dropout(x.into_primitive().tensor(), keys, next_call(), dropout.prob);
        return Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(y));
    }
    dropout.forward(x)
}

/// A backend that can draw the keyed masks itself. The provided method uploads a mask made
/// on the host: the reference the kernels are tested against.
pub trait DropoutOps: Backend {
    /// Whether [`apply`] should use [`DropoutOps::keyed_dropout`] (the backend's own
    /// kernel, switched on).
    fn keyed_dropout_kernel() -> bool {
        false
    }

    /// `x ⊙ mask`, the mask of the rows `keys` names for the stream value `call` (see the
    /// module docs): 0 with probability `prob`, else `1 / (1 - prob)`, both rounded as
    /// the module says.
    fn keyed_dropout(
        x: FloatTensor<Self>,
        keys: &RowKeys<Self>,
        call: u64,
        prob: f64,
    ) -> FloatTensor<Self> {
        dropout_with_host_mask::<Self>(x, keys, call, prob)
    }
}

/// [`DropoutOps::keyed_dropout`] with the mask made on the host and uploaded.
pub fn dropout_with_host_mask<B: Backend>(
    x: FloatTensor<B>,
    keys: &RowKeys<B>,
    call: u64,
    prob: f64,
) -> FloatTensor<B> {
    let shape = x.shape();
    let dtype = x.dtype();
    let device = B::float_device(&x);
    let mask = host_mask(shape.clone(), keys, call, prob);
    let mask = B::float_from_data(TensorData::new(mask, shape), &device);
    B::float_mul(x, B::float_cast(mask, dtype.into()))
}

impl DropoutOps for burn::backend::Flex {}

/// Its mask is its own backward: `dx = dy ⊙ mask`, the mask drawn again.
#[derive(Debug)]
struct KeyedDropoutBackward<B: Backend> {
    keys: RowKeys<B>,
    call: u64,
    prob: f64,
}

impl<B: DropoutOps> Backward<B, 1> for KeyedDropoutBackward<B> {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let dx = B::keyed_dropout(dy, &self.keys, self.call, self.prob);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, dx);
        }
    }
}

impl<B: DropoutOps, C: CheckpointStrategy> DropoutOps for Autodiff<B, C> {
    fn keyed_dropout_kernel() -> bool {
        B::keyed_dropout_kernel()
    }

    fn keyed_dropout(
        x: FloatTensor<Self>,
        keys: &RowKeys<Self>,
        call: u64,
        prob: f64,
    ) -> FloatTensor<Self> {
        let keys = inner_keys(keys);
        let y = B::keyed_dropout(x.primitive, &keys, call, prob);
        KeyedDropoutBackward { keys, call, prob }
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateless(y)
    }
}

/// Runs keyed dropout forward and backward at `prob` on random `[rows, n]` inputs through
/// the backend's op, and compares it with the host-drawn masks (errors of `y` and of `dx`,
/// relative to the largest magnitude); times it against burn's `Dropout` (which draws other
/// masks: only its time is compared).
pub fn compare_with_host_masks<B>(
    device: &B::Device,
    [rows, n]: [usize; 2],
    prob: f64,
    iters: usize,
) -> Result<crate::fused::Comparison<2>, String>
where
    B: burn::tensor::backend::AutodiffBackend + DropoutOps,
    B::InnerBackend: DropoutOps,
{
    use burn::tensor::{Distribution, TensorPrimitive};
    let random = || Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 1.0), device);
    let (x, dy) = (random(), random());
    let call = 0x0DD5_EED5_u64;
    let keyed = || {
        let x = x.clone().detach().require_grad();
        let keys = RowKeys::<B>::grid(0, n);
        let y = B::keyed_dropout(x.clone().into_primitive().tensor(), &keys, call, prob);
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y));
        let grads = (y.clone() * dy.clone()).sum().backward();
        [y.inner(), x.grad(&grads).expect("x takes part")]
    };
    let burns = || {
        let x = x.clone().detach().require_grad();
        let y = burn::nn::DropoutConfig::new(prob).init().forward(x.clone());
        let grads = (y.clone() * dy.clone()).sum().backward();
        [y.inner(), x.grad(&grads).expect("x takes part")]
    };
    let (_, burn_ms) = crate::fused::timed::<B, _>(device, iters, burns)?;
    let (got, fused_ms) = crate::fused::timed::<B, _>(device, iters, keyed)?;
    let inner_keys = RowKeys::<B::InnerBackend>::grid(0, n);
    let reference = |t: Tensor<B::InnerBackend, 2>| {
        let masked = dropout_with_host_mask(t.into_primitive().tensor(), &inner_keys, call, prob);
        Tensor::<B::InnerBackend, 2>::from_primitive(TensorPrimitive::Float(masked))
    };
    let want = [reference(x.inner()), reference(dy.inner())];
    Ok(crate::fused::Comparison {
        errors: crate::fused::relative_errors(got, want)?,
        burn_ms,
        fused_ms,
    })
}

/// The same keys for autodiff's inner backend (whose int tensors autodiff's are).
pub(crate) fn inner_keys<B: Backend, C: CheckpointStrategy>(
    keys: &RowKeys<Autodiff<B, C>>,
) -> RowKeys<B> {
    RowKeys {
        first: keys.first,
        seq: keys.seq,
        offset: keys.offset,
        positions: keys.positions.as_ref().map(|p| Positions {
            host: p.host.clone(),
            device: p.device.clone(),
        }),
    }
}

/// One dropout call that runs inside another op's kernel: the rows, this call's stream
/// value and the drop probability.
#[derive(Clone, Debug)]
pub struct KeyedMask<B: Backend> {
    pub keys: RowKeys<B>,
    pub call: u64,
    pub prob: f64,
}

impl<B: DropoutOps> KeyedMask<B> {
    /// `x ⊙ mask` (see [`DropoutOps::keyed_dropout`]).
    pub fn apply(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        B::keyed_dropout(x, &self.keys, self.call, self.prob)
    }
}

/// The mask of this dropout call when it is to run inside one of the backend's fused
/// kernels ([`DropoutOps::keyed_dropout_kernel`], in training, `prob` above 0); None when
/// [`apply`] is to run it. Takes the stream value [`apply`] would have taken.
pub(crate) fn kernel_mask<B: DropoutOps>(
    dropout: &Dropout,
    keys: &RowKeys<B>,
    device: &B::Device,
) -> Option<KeyedMask<B>> {
    let fused = B::ad_enabled(device) && dropout.prob != 0.0 && B::keyed_dropout_kernel();
    (fused && !computes_on_host::<B>(device)).then(|| KeyedMask {
        keys: keys.clone(),
        call: next_call(),
        prob: dropout.prob,
    })
}

/// The same mask for autodiff's inner backend.
pub(crate) fn inner_mask<B: Backend, C: CheckpointStrategy>(
    mask: &KeyedMask<Autodiff<B, C>>,
) -> KeyedMask<B> {
    KeyedMask {
        keys: inner_keys(&mask.keys),
        call: mask.call,
        prob: mask.prob,
    }
}

/// Whether `B` keeps tensors in host memory (burn's CPU backends).
pub(crate) fn computes_on_host<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name.contains("flex") || name.contains("ndarray")
}

/// The mask of a tensor of `shape` whose rows `keys` names, for the stream value `call`.
fn host_mask<B: Backend>(
    shape: burn::tensor::Shape,
    keys: &RowKeys<B>,
    call: u64,
    prob: f64,
) -> Vec<f32> {
    let row_len = shape.as_slice().last().copied().unwrap_or(1).max(1);
    let rows = shape.num_elements() / row_len;
    row_masks(&keys.host_keys(rows), row_len, call, prob)
}

/// Mask values for rows of `row_len` identified by `keys`: 0 with probability `prob`, else
/// `1 / (1 - prob)`. Each row's values are a function of `call` and the row's key alone.
fn row_masks(keys: &[u64], row_len: usize, call: u64, prob: f64) -> Vec<f32> {
    let drop_below = u64::from(drop_below(prob));
    let keep_scale = keep_scale(prob);
    let mut mask = Vec::with_capacity(keys.len() * row_len);
    for &key in keys {
        let mut start = call ^ key.wrapping_mul(KEY_MULTIPLIER);
        let mut state = splitmix64(&mut start);
        let end = mask.len() + row_len;
        while mask.len() < end {
            let bits = splitmix64(&mut state);
            for lane in 0..4.min(end - mask.len()) {
                let draw = (bits >> (16 * lane)) & 0xFFFF;
                mask.push(if draw < drop_below { 0.0 } else { keep_scale });
            }
        }
    }
    mask
}

/// The 16-bit threshold below which a draw drops its element.
pub(crate) fn drop_below(prob: f64) -> u32 {
    (prob * 65536.0).round() as u32
}

/// What a kept element is multiplied by.
pub(crate) fn keep_scale(prob: f64) -> f32 {
    (65536.0 / (65536 - drop_below(prob)) as f64) as f32
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masks of the next call of this thread's stream.
    fn host_mask(keys: &[u64], row_len: usize, prob: f64) -> Vec<f32> {
        row_masks(keys, row_len, next_call(), prob)
    }

    #[test]
    fn masks_drop_at_the_rate_and_keep_the_mean() {
        seed_dropout(3, 0);
        let keys: Vec<u64> = (0..1000).collect();
        let mask = host_mask(&keys, 1003, 0.1);
        assert_eq!(mask.len(), 1_003_000);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.002, "dropped {dropped}");
        let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.003, "mean {mean}");
    }

    #[test]
    fn masks_are_a_function_of_the_seed() {
        seed_dropout(9, 0);
        let a = (host_mask(&[1, 2], 500, 0.1), host_mask(&[1], 10, 0.5));
        seed_dropout(9, 0);
        let b = (host_mask(&[1, 2], 500, 0.1), host_mask(&[1], 10, 0.5));
        seed_dropout(10, 0);
        let c = host_mask(&[1, 2], 500, 0.1);
        assert_eq!(a, b);
        assert_ne!(a.0, c);
        // Consecutive calls draw different masks for the same rows.
        assert_ne!(host_mask(&[1], 64, 0.1), host_mask(&[1], 64, 0.1));
    }

    /// A row's mask depends on its key, not on where the row sits or which other rows are
    /// drawn with it: what lets the unpadded encoder drop what the padded one drops.
    #[test]
    fn a_rows_mask_is_a_function_of_its_key() {
        seed_dropout(5, 0);
        let padded = host_mask(&[10, 11, 12, 20, 21, 22], 64, 0.1);
        seed_dropout(5, 0);
        let packed = host_mask(&[10, 11, 20], 64, 0.1);
        assert_eq!(packed[..128], padded[..128]);
        assert_eq!(packed[128..], padded[3 * 64..4 * 64]);
        assert_ne!(padded[..64], padded[64..128]);
    }

    /// The keys [`RowKeys`] gives are those the encoders named row by row before it: hidden
    /// rows `(sequence << 32) | position`, attention rows `((sequence · heads + head) << 32)
    /// | query`, listed rows those of their positions, the classifier's pooled rows at
    /// position `u32::MAX`.
    #[test]
    fn row_keys_name_the_rows() {
        type B = burn::backend::Flex;
        let (first, seq, heads) = (5u64, 7usize, 3u64);
        let hidden = RowKeys::<B>::grid(first, seq).host_keys(2 * seq);
        let expected: Vec<u64> = (first..first + 2)
            .flat_map(|s| (0..seq as u64).map(move |p| (s << 32) | p))
            .collect();
        assert_eq!(hidden, expected);

        let attention = RowKeys::<B>::grid(first * heads, seq).host_keys(2 * 3 * seq);
        let expected: Vec<u64> = (first * heads..(first + 2) * heads)
            .flat_map(|r| (0..seq as u64).map(move |q| (r << 32) | q))
            .collect();
        assert_eq!(attention, expected);

        let positions = [0u32, 3, 8, 13];
        let device = Default::default();
        let tensor =
            Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i64, 3, 8, 13], [4]), &device);
        let listed = RowKeys::<B>::listed(first, seq, &positions, tensor).host_keys(4);
        assert_eq!(
            listed,
            [5 << 32, (5 << 32) | 3, (6 << 32) | 1, (6 << 32) | 6]
        );

        let pooled = RowKeys::<B>::grid(first, 1)
            .with_offset(u32::MAX)
            .host_keys(2);
        assert_eq!(pooled, [(5 << 32) | 0xFFFF_FFFF, (6 << 32) | 0xFFFF_FFFF]);
    }
}
