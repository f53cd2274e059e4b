//! The model's parameters as named flat data: what checkpoints, HF export/import, the
//! gradient all-reduce and the optimizer see. Every parameter has its Hugging Face name;
//! the order is the module order, fixed for a given config, so a flat buffer laid out
//! by [`ParamLayout`] means the same thing on every rank.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;

/// Where one parameter lives in a flat buffer, and how it maps to HF.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlot {
    /// HF `BertForPreTraining` name, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    /// Shape as stored here (burn's `[in, out]` for linear weights).
    pub shape: Vec<usize>,
    /// Linear weights are stored transposed relative to HF (`[out, in]` there).
    pub transposed: bool,
    pub offset: usize,
    pub len: usize,
}

impl ParamSlot {
    /// Shape in HF's layout.
    pub fn hf_shape(&self) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if self.transposed {
            shape.reverse();
        }
        shape
    }

    /// Biases and LayerNorm parameters get no weight decay (BERT's recipe).
    pub fn decays(&self) -> bool {
        !(self.name.ends_with(".bias") || self.name.contains("LayerNorm"))
    }
}

/// The layout of all parameters in one flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    pub slots: Vec<ParamSlot>,
    pub total: usize,
}

impl ParamLayout {
    /// The layout of `model` (a [`crate::BertForPreTraining`] or a
    /// [`crate::BertForSequenceClassification`]): HF names follow the module tree.
    pub fn of<B: Backend, M: Module<B>>(model: &M) -> ParamLayout {
        let mut visitor = Collect::new(false);
        model.visit(&mut visitor);
        ParamLayout {
            total: visitor.offset,
            slots: visitor.slots,
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamSlot> {
        self.slots.iter().find(|s| s.name == name)
    }
}

/// HF name of a parameter from its path in the burn module tree.
fn hf_name(path: &[String]) -> (String, bool) {
    let joined = path.join(".");
    let name = joined
        .replace(".self_attention.", ".self.")
        .replace("layer_norm.gamma", "LayerNorm.weight")
        .replace("layer_norm.beta", "LayerNorm.bias");
    // Embedding tables are [rows, hidden] in both; every other matrix is a linear layer.
    let is_matrix_of_linear = !name.ends_with("_embeddings.weight");
    (name, is_matrix_of_linear)
}

/// Visits parameters in module order, tracking the path and flat offset, and copying
/// their values when `data` is present.
struct Collect {
    path: Vec<String>,
    slots: Vec<ParamSlot>,
    offset: usize,
    data: Option<Vec<f32>>,
}

impl Collect {
    fn new(with_data: bool) -> Self {
        Collect {
            path: Vec::new(),
            slots: Vec::new(),
            offset: 0,
            data: with_data.then(Vec::new),
        }
    }
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.shape().dims::<D>().to_vec();
        let (name, linear) = hf_name(&self.path);
        let len = shape.iter().product();
        self.slots.push(ParamSlot {
            name,
            transposed: linear && D == 2,
            shape,
            offset: self.offset,
            len,
        });
        self.offset += len;
        if let Some(data) = &mut self.data {
            append_f32(data, param.val().into_data());
        }
    }
}

/// All parameters, concatenated in layout order.
pub fn flatten_params<B: Backend, M: Module<B>>(model: &M) -> Vec<f32> {
    let mut visitor = Collect::new(true);
    model.visit(&mut visitor);
    visitor.data.unwrap_or_default()
}

fn append_f32(out: &mut Vec<f32>, data: TensorData) {
    match data.as_slice::<f32>() {
        Ok(values) => out.extend_from_slice(values),
        Err(_) => out.extend(data.convert::<f32>().iter::<f32>()),
    }
}

/// How [`accumulate_grads`] combines a micro-batch's gradients with the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// The first micro-batch of a step: the buffer's old contents are replaced (so it
    /// needs no zeroing first).
    Overwrite,
    /// Later micro-batches: added to what is there.
    Add,
}

/// Writes or adds (see [`Accumulation`]) the gradients of all parameters after
/// `backward` into `sums`, in layout order: micro-batches accumulate in one flat buffer
/// without a copy of each. A parameter that took no part in the loss contributes zeros.
pub fn accumulate_grads<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &B::Gradients,
    layout: &ParamLayout,
    sums: &mut [f32],
    how: Accumulation,
) {
    struct Accumulate<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        layout: &'a ParamLayout,
        sums: &'a mut [f32],
        how: Accumulation,
        index: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Accumulate<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let slot = &self.layout.slots[self.index];
            self.index += 1;
            let sums = &mut self.sums[slot.offset..slot.offset + slot.len];
            let Some(grad) = param.val().grad(self.grads) else {
                if self.how == Accumulation::Overwrite {
                    sums.fill(0.0);
                }
                return;
            };
            let data = grad.into_data().convert::<f32>();
            let values = data.as_slice::<f32>().expect("converted to f32");
            match self.how {
                Accumulation::Overwrite => sums.copy_from_slice(values),
                Accumulation::Add => sums.iter_mut().zip(values).for_each(|(s, g)| *s += g),
            }
        }
    }
    assert!(sums.len() >= layout.total, "gradient buffer too short");
    model.visit(&mut Accumulate::<B> {
        grads,
        layout,
        sums,
        how,
        index: 0,
    });
}

/// Replaces every parameter's value with its slice of `flat` (layout order). Parameters
/// that required gradients keep requiring them.
pub fn load_flat_params<B: Backend, M: Module<B>>(
    model: M,
    flat: &[f32],
    layout: &ParamLayout,
) -> M {
    assert_eq!(
        flat.len(),
        layout.total,
        "flat parameter buffer has the wrong length"
    );
    struct Load<'a> {
        flat: &'a [f32],
        layout: &'a ParamLayout,
        index: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let slot = &self.layout.slots[self.index];
            self.index += 1;
            let (id, old, mapper) = param.consume();
            let values = &self.flat[slot.offset..slot.offset + slot.len];
            let data = TensorData::new(values.to_vec(), slot.shape.clone());
            let mut tensor = Tensor::<B, D>::from_data(data, &old.device());
            if old.is_require_grad() {
                tensor = tensor.require_grad();
            }
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    model.map(&mut Load {
        flat,
        layout,
        index: 0,
    })
}

/// Copies a flat buffer from HF layout (per-parameter, in HF shapes) into this
/// project's layout, transposing linear weights.
pub fn hf_to_flat(slot: &ParamSlot, hf_values: &[f32], flat: &mut [f32]) {
    let out = &mut flat[slot.offset..slot.offset + slot.len];
    if slot.transposed {
        let (rows, cols) = (slot.shape[0], slot.shape[1]); // here: [in, out]
        // HF: [out, in] = [cols, rows]
        for r in 0..rows {
            for c in 0..cols {
                out[r * cols + c] = hf_values[c * rows + r];
            }
        }
    } else {
        out.copy_from_slice(hf_values);
    }
}

/// The inverse of [`hf_to_flat`]: one parameter's values in HF layout.
pub fn flat_to_hf(slot: &ParamSlot, flat: &[f32]) -> Vec<f32> {
    let values = &flat[slot.offset..slot.offset + slot.len];
    if !slot.transposed {
        return values.to_vec();
    }
    let (rows, cols) = (slot.shape[0], slot.shape[1]);
    let mut out = vec![0.0; slot.len];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
