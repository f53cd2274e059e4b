//! The learning-rate schedule: linear warmup from 0, then decay to 0 at `max_steps`
//! (linear as in BERT, or polynomial, `(1 - progress)^poly_power`, as in NVIDIA's LAMB
//! recipe with power 0.5). A pure function of the step, so a resumed run needs no
//! schedule state.

use bertrain_coordinator::job::{Decay, TrainSection};

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub max_steps: u64,
    pub decay: Decay,
    /// The exponent of [`Decay::Poly`].
    pub poly_power: f64,
}

impl LrSchedule {
    /// The schedule the job's `[train]` section describes.
    pub fn from_job(t: &TrainSection) -> LrSchedule {
        LrSchedule {
            peak: t.lr,
            warmup_steps: t.warmup_steps,
            max_steps: t.max_steps,
            decay: t.decay,
            poly_power: t.poly_power,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let step = step + 1;
        if step <= self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1);
        let done = (step - self.warmup_steps).min(span);
        let remaining = 1.0 - done as f64 / span as f64;
        match self.decay {
            Decay::Linear => self.peak * remaining,
            Decay::Poly => self.peak * remaining.powf(self.poly_power),
        }
    }
}

/// Whether a thing done every `every_steps` steps (0: never) is due after `done` steps.
pub(crate) fn every(every_steps: u64, done: u64) -> bool {
    every_steps > 0 && done.is_multiple_of(every_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = LrSchedule {
            peak: 1e-4,
            warmup_steps: 10,
            max_steps: 110,
            decay: Decay::Linear,
            poly_power: 0.5,
        };
        assert!((s.at(0) - 1e-5).abs() < 1e-12);
        assert!((s.at(9) - 1e-4).abs() < 1e-12);
        assert!((s.at(59) - 0.5e-4).abs() < 1e-12);
        assert_eq!(s.at(109), 0.0);
        let p = LrSchedule {
            decay: Decay::Poly,
            ..s
        };
        assert!((p.at(59) - 1e-4 * 0.5f64.sqrt()).abs() < 1e-12);
        let cubic = LrSchedule {
            poly_power: 3.0,
            ..p
        };
        assert!((cubic.at(59) - 1e-4 * 0.125).abs() < 1e-12);
        assert_eq!(cubic.at(109), 0.0);
    }
}
