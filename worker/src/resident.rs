//! Master parameters and AdamW state kept on the device (the GPU path), for any model
//! (pretraining in `Trainer`, fine-tuning in `bertrain-finetune`).
//!
//! The host path (`Trainer` without this) copies every step's gradients to a flat host
//! buffer, updates host copies of the parameters and loads them back into the model: right
//! for the CPU, where "device" memory is host memory and the TCP ring wants host buffers,
//! but on a GPU it moves 2 x 440 MB over PCIe and runs AdamW on the CPU each BERT-base step,
//! far longer than the step's compute. Here the same arithmetic runs on the device:
//!
//! gradients (one flat f32 tensor, in `ParamLayout` order) -> all-reduce -> clip -> AdamW
//! on flat f32 master tensors -> each parameter sliced back into the model (cast to the
//! model's float type: bf16 compute keeps f32 master weights and moments).
//!
//! Only scalars cross to the host each step (the gradient norm, the stop vote), and the
//! whole state only when a checkpoint asks for it ([`DeviceMaster::download`]). With more
//! than one rank, NCCL reduces the flat gradient tensor in place in device memory (one
//! bucket: the whole model, after the backward pass); other collectives get a host copy.

use anyhow::{Result, bail};
use bertrain_model::fused::adamw::{AdamwOps, AdamwStep};
use bertrain_model::{Accumulation, ParamLayout, in_f32};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;

use crate::collective::Collective;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerState};

/// Flat f32 tensors on the device, all of `ParamLayout::total` elements.
pub struct DeviceMaster<B: Backend> {
    params: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    /// 1 where weight decay applies (matrices), 0 elsewhere (biases, LayerNorm).
    decays: Tensor<B, 1>,
    /// This step's gradients once [`accumulate`](Self::accumulate) has run.
    grads: Option<Tensor<B, 1>>,
}

fn f32_tensor<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))
}

fn to_host(t: &Tensor<impl Backend, 1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("converted to f32")
}

impl<B: AdamwOps> DeviceMaster<B> {
    /// Copies the host master parameters and optimizer state to `device`. Only AdamW runs
    /// here (LAMB needs per-parameter norms; it stays on the host path).
    pub fn upload(
        optimizer: &OptimizerConfig,
        layout: &ParamLayout,
        params: &[f32],
        state: &OptimizerState,
        device: &B::Device,
    ) -> Result<DeviceMaster<B>> {
        if optimizer.kind != Optimizer::Adamw {
            bail!("optimizer state on the device supports AdamW only");
        }
        let mut decays = vec![0.0; layout.total];
        for slot in layout.slots.iter().filter(|s| s.decays()) {
            decays[slot.offset..slot.offset + slot.len].fill(1.0);
        }
        Ok(DeviceMaster {
            params: f32_tensor(params.to_vec(), device),
            exp_avg: f32_tensor(state.exp_avg.clone(), device),
            exp_avg_sq: f32_tensor(state.exp_avg_sq.clone(), device),
            decays: f32_tensor(decays, device),
            grads: None,
        })
    }

    /// Copies parameters and moments back to the host (for a checkpoint).
    pub fn download(&self, params: &mut Vec<f32>, state: &mut OptimizerState) {
        *params = to_host(&self.params);
        state.exp_avg = to_host(&self.exp_avg);
        state.exp_avg_sq = to_host(&self.exp_avg_sq);
    }

    /// Writes (or adds, for later micro-batches) the gradients after `backward` into the
    /// flat gradient tensor. A parameter without a gradient contributes zeros.
    pub fn accumulate<A: AutodiffBackend<InnerBackend = B>, M: Module<A>>(
        &mut self,
        model: &M,
        gradients: &A::Gradients,
        layout: &ParamLayout,
        how: Accumulation,
    ) {
        struct Flatten<'a, A: AutodiffBackend> {
            gradients: &'a A::Gradients,
            layout: &'a ParamLayout,
            pieces: Vec<Tensor<A::InnerBackend, 1>>,
        }
        impl<A: AutodiffBackend> ModuleVisitor<A> for Flatten<'_, A> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                let len = self.layout.slots[self.pieces.len()].len;
                let piece = match param.val().grad(self.gradients) {
                    Some(grad) => in_f32(grad.reshape([len])),
                    None => {
                        let device = param.val().inner().device();
                        Tensor::zeros([len], (&device, DType::F32))
                    }
                };
                self.pieces.push(piece);
            }
        }
        let mut flatten = Flatten::<A> {
            gradients,
            layout,
            pieces: Vec::with_capacity(layout.slots.len()),
        };
        model.visit(&mut flatten);
        let flat = Tensor::cat(flatten.pieces, 0);
        self.grads = match (how, self.grads.take()) {
            (Accumulation::Add, Some(sum)) => Some(sum + flat),
            _ => Some(flat),
        };
    }

    /// Zero gradients: this rank had no rows this step.
    pub fn zero_grads(&mut self, layout: &ParamLayout) {
        self.grads = Some(Tensor::zeros(
            [layout.total],
            (&self.params.device(), DType::F32),
        ));
    }

    /// Averages the gradients over the ranks; returns whether any rank voted to stop (the
    /// vote rides along as one more element, as on the host path).
    pub fn all_reduce(&mut self, collective: &mut dyn Collective, stop_vote: bool) -> Result<bool> {
        let grads = self
            .grads
            .take()
            .expect("accumulate runs before all_reduce");
        if collective.world_size() == 1 {
            self.grads = Some(grads);
            return Ok(stop_vote);
        }
        // On a GPU with NCCL: reduce the tensor where it is (burn's CUDA tensors are the
        // only ones NCCL can take, hence the type test), and the vote on its own.
        #[cfg(feature = "cuda")]
        if let Some(nccl) = collective.as_nccl()
            && let Some(cuda) =
                (&grads as &dyn std::any::Any).downcast_ref::<crate::collective::CudaTensor>()
        {
            nccl.all_reduce_mean_tensor(cuda)?;
            let mut vote = [if stop_vote { 1.0 } else { 0.0 }];
            nccl.all_reduce_mean(&mut vote)?;
            self.grads = Some(grads);
            return Ok(vote[0] > 0.0);
        }
        let device = grads.device();
        let mut host = to_host(&grads);
        host.push(if stop_vote { 1.0 } else { 0.0 });
        collective.all_reduce_mean(&mut host)?;
        let agreed = host.pop().is_some_and(|v| v > 0.0);
        self.grads = Some(f32_tensor(host, &device));
        Ok(agreed)
    }

    /// Scales the gradients to a global L2 norm of at most `max_norm` (none for
    /// `max_norm <= 0`); returns the norm before clipping.
    pub fn clip(&mut self, max_norm: f32) -> f32 {
        let grads = self.grads.take().expect("accumulate runs before clip");
        let norm = grads
            .clone()
            .powi_scalar(2)
            .sum()
            .sqrt()
            .into_scalar()
            .elem::<f32>();
        self.grads = Some(if max_norm > 0.0 && norm > max_norm {
            grads.mul_scalar(max_norm / (norm + 1e-6))
        } else {
            grads
        });
        norm
    }

    /// One AdamW update, the same rule as `optim::update` (same order of operations): the
    /// backend's fused kernel where it has one switched on (`bertrain_model::fused`),
    /// burn's ops otherwise.
    pub fn adamw(&mut self, config: &OptimizerConfig, state: &mut OptimizerState, lr: f32) {
        let grads = self.grads.take().expect("accumulate runs before adamw");
        state.step += 1;
        let t = state.step as i32;
        let step = AdamwStep {
            lr,
            beta1: config.beta1,
            beta2: config.beta2,
            epsilon: config.epsilon,
            weight_decay: config.weight_decay,
            bias1: 1.0 - config.beta1.powi(t),
            bias2: 1.0 - config.beta2.powi(t),
        };
        let [params, exp_avg, exp_avg_sq] = B::adamw(
            self.params.clone(),
            self.exp_avg.clone(),
            self.exp_avg_sq.clone(),
            grads,
            self.decays.clone(),
            &step,
        );
        self.params = params;
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
    }

    /// The model with every parameter replaced by its slice of the master parameters, in
    /// the model's own float type.
    pub fn write_into<A: AutodiffBackend<InnerBackend = B>, M: Module<A>>(
        &self,
        model: M,
        layout: &ParamLayout,
    ) -> M {
        struct Load<'a, B: Backend> {
            flat: &'a Tensor<B, 1>,
            layout: &'a ParamLayout,
            index: usize,
        }
        impl<A: AutodiffBackend> ModuleMapper<A> for Load<'_, A::InnerBackend> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<A, D>>,
            ) -> Param<Tensor<A, D>> {
                let slot = &self.layout.slots[self.index];
                self.index += 1;
                let (id, old, mapper) = param.consume();
                let shape: [usize; D] = slot.shape.clone().try_into().expect("rank D");
                let mut values = self
                    .flat
                    .clone()
                    .slice(slot.offset..slot.offset + slot.len)
                    .reshape(shape);
                if old.dtype() != DType::F32 {
                    values = values.cast(old.dtype());
                }
                let mut tensor = Tensor::<A, D>::from_inner(values);
                if old.is_require_grad() {
                    tensor = tensor.require_grad();
                }
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
        model.map(&mut Load::<B> {
            flat: &self.params,
            layout,
            index: 0,
        })
    }
}
