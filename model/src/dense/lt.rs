//! How the model's products map onto cuBLASLt calls: pure functions, no CUDA needed.
//!
//! burn's tensors are row-major; cuBLASLt is column-major. A row-major `r × c` matrix
//! with leading dimension `ld` is, byte for byte, the column-major `c × r` matrix with the
//! same `ld`: its transpose. So the row-major product `C = op(A) · op(B)` is computed as
//! the column-major `Cᵀ = op(B)ᵀ · op(A)ᵀ`: cuBLASLt's first operand is the row-major
//! product's B, its second is A, each keeps its own transpose flag, and every vector
//! that runs along the row-major C's columns (a bias, a bias gradient) runs along the
//! column-major D's rows. [`LtCall::of`] does this mapping; [`Epilogue`] names what
//! cuBLASLt fuses into a product, and [`DensePlan`] chooses it per product of a layer.

/// A row-major matrix (or a strided batch of them) in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMajor {
    pub rows: usize,
    pub cols: usize,
    /// Elements between the starts of two consecutive rows (≥ `cols`).
    pub ld: usize,
    /// Elements between two consecutive matrices of a batch (0 for a single matrix).
    pub batch_stride: usize,
}

impl RowMajor {
    /// A dense `rows × cols` matrix.
    pub fn dense(rows: usize, cols: usize) -> Self {
        RowMajor {
            rows,
            cols,
            ld: cols,
            batch_stride: 0,
        }
    }
}

/// The row-major product `C = op(A) · op(B)` over `batch` matrices, where `op(X)` is
/// `Xᵀ` when the flag is set.
#[derive(Clone, Copy, Debug)]
pub struct Product {
    pub a: RowMajor,
    pub a_transposed: bool,
    pub b: RowMajor,
    pub b_transposed: bool,
    pub c: RowMajor,
    pub batch: usize,
}

/// One matrix as cuBLASLt's `cublasLtMatrixLayoutCreate` takes it: column-major,
/// `rows × cols` as stored (before the call's transpose), leading dimension `ld`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ColumnMajor {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub batch_stride: usize,
}

/// The arguments of one `cublasLtMatmul`: `D = op(A) · op(B)` with `op(A)` of `m × k`,
/// `op(B)` of `k × n`, `D` of `m × n`, all column-major. Its A is the memory of the row-
/// major product's B, its B the memory of the row-major A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: ColumnMajor,
    pub b: ColumnMajor,
    pub d: ColumnMajor,
    pub batch: usize,
}

impl LtCall {
    /// The column-major call computing the row-major `product`; an error names the first
    /// mismatch in its shapes.
    pub fn of(p: &Product) -> Result<LtCall, String> {
        let op = |x: RowMajor, t: bool| {
            if t {
                (x.cols, x.rows)
            } else {
                (x.rows, x.cols)
            }
        };
        let (m, k) = op(p.a, p.a_transposed);
        let (kb, n) = op(p.b, p.b_transposed);
        if k != kb {
            return Err(format!(
                "inner dimensions differ: op(A) is {m}×{k}, op(B) is {kb}×{n}"
            ));
        }
        if (p.c.rows, p.c.cols) != (m, n) {
            return Err(format!(
                "C is {}×{}, the product is {m}×{n}",
                p.c.rows, p.c.cols
            ));
        }
        for (name, x) in [("A", p.a), ("B", p.b), ("C", p.c)] {
            if x.ld < x.cols {
                return Err(format!(
                    "{name}'s leading dimension {} is below its {} columns",
                    x.ld, x.cols
                ));
            }
        }
        if p.batch == 0 {
            return Err("a batch of no products".into());
        }
        let column_major = |x: RowMajor| ColumnMajor {
            rows: x.cols,
            cols: x.rows,
            ld: x.ld,
            batch_stride: x.batch_stride,
        };
        Ok(LtCall {
            trans_a: p.b_transposed,
            trans_b: p.a_transposed,
            m: n,
            n: m,
            k,
            a: column_major(p.b),
            b: column_major(p.a),
            d: column_major(p.c),
            batch: p.batch,
        })
    }
}

/// What cuBLASLt applies to a product `P = op(A) · op(B)` (column-major, `m × n`) before
/// writing `D`. Vectors have `m` entries (one per row of `D`), except `BGradB`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `D = P`.
    Default,
    /// `D = P + bias`.
    Bias,
    /// `aux = P + bias`; `D = gelu_tanh(aux)`. `aux` has `D`'s shape.
    GeluAuxBias,
    /// `D = P ⊙ gelu_tanh'(aux)`; `bias = Σ_columns D`.
    DGeluBGrad,
    /// `bias = Σ_k op(A)` (length `m`); `D = P`.
    BGradA,
    /// `bias = Σ_k op(B)` (length `n`); `D = P`.
    BGradB,
}

impl Epilogue {
    /// Whether cuBLASLt runs this epilogue on `call`: a bias gradient is reduced from a
    /// non-transposed A (`BGradA`) or a transposed B (`BGradB`) only, and no epilogue with
    /// a vector is used on batched calls (the vector would need a batch stride).
    pub fn check(self, call: &LtCall) -> Result<(), String> {
        match self {
            Epilogue::BGradA if call.trans_a => {
                Err("BGRADA needs cuBLASLt's A untransposed".into())
            }
            Epilogue::BGradB if !call.trans_b => Err("BGRADB needs cuBLASLt's B transposed".into()),
            Epilogue::Default => Ok(()),
            _ if call.batch > 1 => Err(format!("{self:?} on a batch of {}", call.batch)),
            _ => Ok(()),
        }
    }
}

/// The alignment cuBLASLt may assume for a buffer at `address`: the largest power of two
/// dividing it, up to the 256 bytes its algorithm choice assumes by default (burn-cuda's
/// allocations are 512-aligned, but a tensor may start inside one).
pub fn alignment_of(address: u64) -> u32 {
    1 << address.trailing_zeros().min(8)
}

/// Which row-major operand of a weight-gradient product holds the output gradient whose
/// sum over tokens is the bias gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMajorOperand {
    A,
    B,
}

/// The epilogue that sums `source` over the shared dimension: the operands swap in the
/// column-major call, so the row-major B is cuBLASLt's A.
pub fn bias_gradient_of(source: RowMajorOperand) -> Epilogue {
    match source {
        RowMajorOperand::A => Epilogue::BGradB,
        RowMajorOperand::B => Epilogue::BGradA,
    }
}

/// The activation a dense layer applies after its bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `x Φ(x)`, HF's `gelu`: what BERT's checkpoints were trained with.
    GeluErf,
    /// The tanh approximation, HF's `gelu_new`: the only GELU cuBLASLt fuses.
    GeluTanh,
}

/// The epilogue of each product of one dense layer `Y = act(X W + b)`, `W` being
/// `[in, out]` as burn stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DensePlan {
    /// `Y = X W` (+ bias, + activation when fused).
    pub forward: Epilogue,
    /// Whether an element-wise GELU (erf) must follow the forward product, which then
    /// wrote the pre-activation.
    pub separate_activation: bool,
    /// `dW = Xᵀ dZ`, where `dZ` is the gradient at the pre-activation; with `BGradA` it
    /// also gives the bias gradient.
    pub weight_gradient: Epilogue,
    /// `dX = dZ Wᵀ`: fuses the previous layer's tanh-GELU gradient (and its bias
    /// gradient) when the input `X` is such a layer's output.
    pub input_gradient: Epilogue,
}

impl DensePlan {
    /// The plan for a layer with activation `act` whose input comes from a layer with
    /// activation `input_from` (`Identity` for anything but a dense layer's output).
    ///
    /// A tanh GELU is fused forward (keeping its pre-activation as `aux`) and backward
    /// into the product that computes its output's gradient, which belongs to the
    /// consuming layer; that product then also yields this layer's bias gradient. The erf
    /// GELU is never approximated: its forward and gradient are separate element-wise
    /// kernels, and the bias gradient comes with the weight gradient.
    pub fn new(act: Activation, input_from: Activation) -> DensePlan {
        let fused_gelu = act == Activation::GeluTanh;
        DensePlan {
            forward: if fused_gelu {
                Epilogue::GeluAuxBias
            } else {
                Epilogue::Bias
            },
            separate_activation: act == Activation::GeluErf,
            weight_gradient: if fused_gelu {
                // The consumer's dX product already reduced dZ into the bias gradient.
                Epilogue::Default
            } else {
                bias_gradient_of(RowMajorOperand::B)
            },
            input_gradient: if input_from == Activation::GeluTanh {
                Epilogue::DGeluBGrad
            } else {
                Epilogue::Default
            },
        }
    }

    /// The three products of the layer for `tokens` rows of `x` (`[tokens, d_in]`) and
    /// a weight of `[d_in, d_out]`: forward, weight gradient, input gradient.
    pub fn products(tokens: usize, d_in: usize, d_out: usize) -> [Product; 3] {
        let x = RowMajor::dense(tokens, d_in);
        let w = RowMajor::dense(d_in, d_out);
        let y = RowMajor::dense(tokens, d_out);
        let product = |a, a_transposed, b, b_transposed, c| Product {
            a,
            a_transposed,
            b,
            b_transposed,
            c,
            batch: 1,
        };
        [
            product(x, false, w, false, y),
            product(x, true, y, false, w),
            product(y, false, w, true, x),
        ]
    }
}

impl Product {
    /// `op(A) · op(B)` over `batch` contiguous matrices each, `A` stored `[batch, a_rows,
    /// a_cols]` and `B` `[batch, b_rows, b_cols]`, into a contiguous `C`. An error names
    /// the mismatch.
    pub fn batched(
        batch: usize,
        [a_rows, a_cols]: [usize; 2],
        a_transposed: bool,
        [b_rows, b_cols]: [usize; 2],
        b_transposed: bool,
    ) -> Result<Product, String> {
        let stored = |rows, cols| RowMajor {
            rows,
            cols,
            ld: cols,
            batch_stride: rows * cols,
        };
        let m = if a_transposed { a_cols } else { a_rows };
        let n = if b_transposed { b_rows } else { b_cols };
        let product = Product {
            a: stored(a_rows, a_cols),
            a_transposed,
            b: stored(b_rows, b_cols),
            b_transposed,
            c: stored(m, n),
            batch,
        };
        LtCall::of(&product).map(|_| product)
    }
}

/// The attention products of one layer for `batch` sequences of `seq` positions and
/// `heads` heads of `head_dim`, each head's Q, K and V contiguous `[seq, head_dim]`
/// matrices laid out `[batch × heads, seq, head_dim]`: scores `Q Kᵀ` and context `P V`,
/// each one strided-batched call.
pub fn attention_products(batch: usize, heads: usize, seq: usize, head_dim: usize) -> [Product; 2] {
    let count = batch * heads;
    let product =
        |a, a_t, b, b_t| Product::batched(count, a, a_t, b, b_t).expect("attention's shapes agree");
    [
        product([seq, head_dim], false, [seq, head_dim], true),
        product([seq, seq], false, [seq, head_dim], false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::fixtures::values(len, seed, 1.0)
    }

    fn gelu_tanh(x: f32) -> f32 {
        let c = (2.0 / std::f32::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    }

    fn gelu_tanh_grad(x: f32) -> f32 {
        let c = (2.0 / std::f32::consts::PI).sqrt();
        let t = (c * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    }

    /// What `cublasLtMatmul` computes, as its documentation defines it: column-major
    /// operands read through their layouts, `D = epilogue(op(A) · op(B))`. Returns `D` and
    /// the epilogue's vector (bias gradient) when it has one; `aux` is read by
    /// `DGeluBGrad` and written by `GeluAuxBias`.
    fn cublaslt_reference(
        call: &LtCall,
        a: &[f32],
        b: &[f32],
        epilogue: Epilogue,
        bias: Option<&[f32]>,
        aux: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let at = |m: &ColumnMajor, data: &[f32], batch: usize, r: usize, c: usize| {
            data[batch * m.batch_stride + c * m.ld + r]
        };
        // op(X)[r, c]
        let op_a = |i, r, c| {
            if call.trans_a {
                at(&call.a, a, i, c, r)
            } else {
                at(&call.a, a, i, r, c)
            }
        };
        let op_b = |i, r, c| {
            if call.trans_b {
                at(&call.b, b, i, c, r)
            } else {
                at(&call.b, b, i, r, c)
            }
        };
        let d_len =
            (call.batch - 1) * call.d.batch_stride + (call.d.cols - 1) * call.d.ld + call.d.rows;
        let mut d = vec![0f32; d_len];
        let mut vector = Vec::new();
        for i in 0..call.batch {
            for q in 0..call.n {
                for p in 0..call.m {
                    let mut sum = 0f32;
                    for l in 0..call.k {
                        sum += op_a(i, p, l) * op_b(i, l, q);
                    }
                    let index = i * call.d.batch_stride + q * call.d.ld + p;
                    d[index] = match epilogue {
                        Epilogue::Bias => sum + bias.unwrap()[p],
                        Epilogue::GeluAuxBias => {
                            aux[index] = sum + bias.unwrap()[p];
                            gelu_tanh(aux[index])
                        }
                        Epilogue::DGeluBGrad => sum * gelu_tanh_grad(aux[index]),
                        _ => sum,
                    };
                }
            }
        }
        match epilogue {
            Epilogue::BGradA => {
                vector = (0..call.m)
                    .map(|p| (0..call.k).map(|l| op_a(0, p, l)).sum())
                    .collect()
            }
            Epilogue::BGradB => {
                vector = (0..call.n)
                    .map(|q| (0..call.k).map(|l| op_b(0, l, q)).sum())
                    .collect()
            }
            Epilogue::DGeluBGrad => {
                vector = (0..call.m)
                    .map(|p| (0..call.n).map(|q| d[q * call.d.ld + p]).sum())
                    .collect()
            }
            _ => {}
        }
        (d, vector)
    }

    /// Row-major `op(A) · op(B)` for one matrix of a batch, the plain way.
    fn row_major_product(p: &Product, a: &[f32], b: &[f32], batch: usize) -> Vec<f32> {
        let get = |m: &RowMajor, data: &[f32], t: bool, r: usize, c: usize| {
            let (r, c) = if t { (c, r) } else { (r, c) };
            data[batch * m.batch_stride + r * m.ld + c]
        };
        let (rows, cols) = (p.c.rows, p.c.cols);
        let k = if p.a_transposed { p.a.rows } else { p.a.cols };
        let mut c = vec![0f32; rows * cols];
        for r in 0..rows {
            for j in 0..cols {
                c[r * cols + j] = (0..k)
                    .map(|l| {
                        get(&p.a, a, p.a_transposed, r, l) * get(&p.b, b, p.b_transposed, l, j)
                    })
                    .sum();
            }
        }
        c
    }

    fn close(x: &[f32], y: &[f32]) {
        assert_eq!(x.len(), y.len());
        for (i, (x, y)) in x.iter().zip(y).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    fn run(
        p: &Product,
        a: &[f32],
        b: &[f32],
        epilogue: Epilogue,
        bias: Option<&[f32]>,
        aux: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        // The row-major B is cuBLASLt's A.
        cublaslt_reference(&LtCall::of(p).unwrap(), b, a, epilogue, bias, aux)
    }

    #[test]
    fn every_dense_product_maps_to_the_row_major_result() {
        let (tokens, d_in, d_out) = (7, 5, 3);
        for (which, p) in DensePlan::products(tokens, d_in, d_out).iter().enumerate() {
            let a = values(p.a.rows * p.a.cols, 1 + which as u64);
            let b = values(p.b.rows * p.b.cols, 11 + which as u64);
            let (d, _) = run(p, &a, &b, Epilogue::Default, None, &mut []);
            close(&d, &row_major_product(p, &a, &b, 0));
        }
    }

    #[test]
    fn batched_attention_products_map_per_head() {
        let (batch, heads, seq, head_dim) = (2, 3, 4, 5);
        for (which, p) in attention_products(batch, heads, seq, head_dim)
            .iter()
            .enumerate()
        {
            let a = values(p.batch * p.a.batch_stride, 21 + which as u64);
            let b = values(p.batch * p.b.batch_stride, 31 + which as u64);
            let (d, _) = run(p, &a, &b, Epilogue::Default, None, &mut []);
            for i in 0..p.batch {
                let one = &d[i * p.c.batch_stride..][..p.c.rows * p.c.cols];
                close(one, &row_major_product(p, &a, &b, i));
            }
        }
    }

    /// Every combination of transposes, as the batched op's backward uses them.
    #[test]
    fn batched_products_map_for_every_transpose() {
        let (batch, m, k, n) = (3, 4, 5, 2);
        for (which, (a_t, b_t)) in [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .enumerate()
        {
            let a = if a_t { [k, m] } else { [m, k] };
            let b = if b_t { [n, k] } else { [k, n] };
            let p = Product::batched(batch, a, a_t, b, b_t).unwrap();
            assert_eq!((p.c.rows, p.c.cols, p.c.batch_stride), (m, n, m * n));
            let a = values(batch * m * k, 61 + which as u64);
            let b = values(batch * k * n, 71 + which as u64);
            let (d, _) = run(&p, &a, &b, Epilogue::Default, None, &mut []);
            for i in 0..batch {
                close(&d[i * m * n..][..m * n], &row_major_product(&p, &a, &b, i));
            }
        }
        assert!(
            Product::batched(2, [3, 4], false, [5, 6], false)
                .unwrap_err()
                .contains("inner dimensions")
        );
    }

    #[test]
    fn rows_with_a_wider_stride_are_read_through_the_leading_dimension() {
        // Q as the first head_dim columns of a packed [tokens, 3 × hidden] QKV matrix.
        let q = RowMajor {
            rows: 6,
            cols: 4,
            ld: 12,
            batch_stride: 0,
        };
        let w = RowMajor::dense(4, 2);
        let p = Product {
            a: q,
            a_transposed: false,
            b: w,
            b_transposed: false,
            c: RowMajor::dense(6, 2),
            batch: 1,
        };
        let a = values(6 * 12, 41);
        let b = values(8, 42);
        let (d, _) = run(&p, &a, &b, Epilogue::Default, None, &mut []);
        close(&d, &row_major_product(&p, &a, &b, 0));
    }

    #[test]
    fn mismatched_shapes_are_refused_by_name() {
        let [mut forward, ..] = DensePlan::products(4, 3, 2);
        forward.b = RowMajor::dense(5, 2);
        assert!(
            LtCall::of(&forward)
                .unwrap_err()
                .contains("inner dimensions")
        );
        let [mut forward, ..] = DensePlan::products(4, 3, 2);
        forward.c = RowMajor::dense(4, 3);
        assert!(LtCall::of(&forward).unwrap_err().starts_with("C is 4×3"));
    }

    /// A two-layer feed-forward block, `Y = Z₁' W₂ + b₂` with `Z₁' = gelu(X W₁ + b₁)`,
    /// forward and backward through the planned epilogues, against the same computed
    /// row by row: bias placement, the aux buffer and both bias-gradient epilogues.
    #[test]
    fn a_tanh_gelu_block_through_its_epilogues_matches_plain_math() {
        let (tokens, d_in, d_mid, d_out) = (6, 4, 5, 3);
        let x = values(tokens * d_in, 51);
        let w1 = values(d_in * d_mid, 52);
        let b1 = values(d_mid, 53);
        let w2 = values(d_mid * d_out, 54);
        let b2 = values(d_out, 55);
        let dy = values(tokens * d_out, 56);
        let first = DensePlan::new(Activation::GeluTanh, Activation::Identity);
        let second = DensePlan::new(Activation::Identity, Activation::GeluTanh);
        assert_eq!(first.forward, Epilogue::GeluAuxBias);
        assert_eq!(second.input_gradient, Epilogue::DGeluBGrad);

        let [f1, w1_grad, x_grad] = DensePlan::products(tokens, d_in, d_mid);
        let [f2, w2_grad, h_grad] = DensePlan::products(tokens, d_mid, d_out);
        let mut pre = vec![0f32; tokens * d_mid];
        let (h, _) = run(&f1, &x, &w1, first.forward, Some(&b1), &mut pre);
        let (y, _) = run(&f2, &h, &w2, second.forward, Some(&b2), &mut []);
        let (dw2, db2) = run(&w2_grad, &h, &dy, second.weight_gradient, None, &mut []);
        // dZ₁ = (dY W₂ᵀ) ⊙ gelu'(pre), and b₁'s gradient with it.
        let (dz1, db1) = run(&h_grad, &dy, &w2, second.input_gradient, None, &mut pre);
        let (dw1, none) = run(&w1_grad, &x, &dz1, first.weight_gradient, None, &mut []);
        let (dx, _) = run(&x_grad, &dz1, &w1, first.input_gradient, None, &mut []);
        assert!(none.is_empty());

        // The same, plainly.
        let matmul = |a: &[f32], b: &[f32], m: usize, k: usize, n: usize| -> Vec<f32> {
            (0..m * n)
                .map(|i| (0..k).map(|l| a[i / n * k + l] * b[l * n + i % n]).sum())
                .collect()
        };
        let transpose = |a: &[f32], r: usize, c: usize| -> Vec<f32> {
            (0..r * c).map(|i| a[(i % r) * c + i / r]).collect()
        };
        let plain_pre: Vec<f32> = matmul(&x, &w1, tokens, d_in, d_mid)
            .iter()
            .enumerate()
            .map(|(i, v)| v + b1[i % d_mid])
            .collect();
        let plain_h: Vec<f32> = plain_pre.iter().map(|&v| gelu_tanh(v)).collect();
        let plain_y: Vec<f32> = matmul(&plain_h, &w2, tokens, d_mid, d_out)
            .iter()
            .enumerate()
            .map(|(i, v)| v + b2[i % d_out])
            .collect();
        let column_sums = |a: &[f32], cols: usize| -> Vec<f32> {
            (0..cols)
                .map(|j| a.iter().skip(j).step_by(cols).sum())
                .collect()
        };
        let plain_dh = matmul(&dy, &transpose(&w2, d_mid, d_out), tokens, d_out, d_mid);
        let plain_dz1: Vec<f32> = plain_dh
            .iter()
            .zip(&plain_pre)
            .map(|(g, &z)| g * gelu_tanh_grad(z))
            .collect();
        close(&pre, &plain_pre);
        close(&h, &plain_h);
        close(&y, &plain_y);
        close(
            &dw2,
            &matmul(
                &transpose(&plain_h, tokens, d_mid),
                &dy,
                d_mid,
                tokens,
                d_out,
            ),
        );
        close(&db2, &column_sums(&dy, d_out));
        close(&dz1, &plain_dz1);
        close(&db1, &column_sums(&plain_dz1, d_mid));
        close(
            &dw1,
            &matmul(
                &transpose(&x, tokens, d_in),
                &plain_dz1,
                d_in,
                tokens,
                d_mid,
            ),
        );
        close(
            &dx,
            &matmul(
                &plain_dz1,
                &transpose(&w1, d_in, d_mid),
                tokens,
                d_mid,
                d_in,
            ),
        );
    }

    #[test]
    fn the_erf_gelu_is_never_fused() {
        let plan = DensePlan::new(Activation::GeluErf, Activation::Identity);
        assert_eq!(plan.forward, Epilogue::Bias);
        assert!(plan.separate_activation);
        assert_eq!(plan.weight_gradient, Epilogue::BGradA);
        let next = DensePlan::new(Activation::Identity, Activation::GeluErf);
        assert_eq!(next.input_gradient, Epilogue::Default);
    }

    /// Every epilogue the plan picks is one cuBLASLt runs on its call (a bias gradient from
    /// an untransposed A or a transposed B); the other orientations are refused.
    #[test]
    fn planned_epilogues_suit_their_calls() {
        for act in [
            Activation::Identity,
            Activation::GeluErf,
            Activation::GeluTanh,
        ] {
            for input_from in [Activation::Identity, Activation::GeluTanh] {
                let plan = DensePlan::new(act, input_from);
                let [forward, weight, input] = DensePlan::products(64, 32, 48);
                for (epilogue, product) in [
                    (plan.forward, forward),
                    (plan.weight_gradient, weight),
                    (plan.input_gradient, input),
                ] {
                    let call = LtCall::of(&product).unwrap();
                    assert_eq!(epilogue.check(&call), Ok(()), "{act:?} {epilogue:?}");
                }
            }
        }
        let [_, weight, _] = DensePlan::products(64, 32, 48);
        let call = LtCall::of(&weight).unwrap();
        let flipped = LtCall {
            trans_a: !call.trans_a,
            ..call
        };
        assert!(Epilogue::BGradA.check(&flipped).is_err());
        let b_untransposed = LtCall {
            trans_b: false,
            ..call
        };
        assert!(Epilogue::BGradB.check(&b_untransposed).is_err());
        let [scores, _] = attention_products(2, 3, 4, 5);
        let batched = LtCall::of(&scores).unwrap();
        assert_eq!(Epilogue::Default.check(&batched), Ok(()));
        assert!(Epilogue::Bias.check(&batched).is_err());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment_of(0x7f00_0000_0000), 256);
        assert_eq!(alignment_of(0x7f00_0000_0200), 256);
        assert_eq!(alignment_of(0x7f00_0000_0080), 128);
        assert_eq!(alignment_of(0x7f00_0000_0002), 2);
        assert_eq!(alignment_of(0x7f00_0000_0001), 1);
    }

    #[test]
    fn a_bias_gradient_from_the_row_major_a_uses_bgradb() {
        // dbᵀ as Σ over tokens of the row-major A of `dYᵀ · X` (a layout some callers use).
        let (tokens, d_in, d_out) = (5, 3, 4);
        let dy = values(tokens * d_out, 61);
        let x = values(tokens * d_in, 62);
        let p = Product {
            a: RowMajor::dense(tokens, d_out),
            a_transposed: true,
            b: RowMajor::dense(tokens, d_in),
            b_transposed: false,
            c: RowMajor::dense(d_out, d_in),
            batch: 1,
        };
        let (_, db) = run(
            &p,
            &dy,
            &x,
            bias_gradient_of(RowMajorOperand::A),
            None,
            &mut [],
        );
        let expected: Vec<f32> = (0..d_out)
            .map(|j| dy.iter().skip(j).step_by(d_out).sum())
            .collect();
        close(&db, &expected);
    }
}
