//! Training throughput and model FLOPs utilisation (MFU), as the worker prints them.
//!
//! MFU is the model's FLOPs per second (matrix products of the forward and backward pass,
//! [`HostBatch::training_flops`](crate::batch::HostBatch::training_flops), padding
//! excluded) over the device's dense peak. Time is the whole step's wall time: data wait,
//! all-reduce and optimizer included, so the figure is what the job really gets.

use std::time::Duration;

/// Dense bf16 tensor-core peaks (no sparsity) of data-centre GPUs, in TFLOP/s, by a part
/// of the name the driver reports; the first match wins, so specific names come first.
const GPU_BF16_TFLOPS: &[(&str, f64)] = &[
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
];

/// The peak that MFU is relative to, and where the figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    pub tflops: f64,
    pub source: String,
}

impl Peak {
    /// The dense bf16 peak of the GPU the driver calls `name`, if it is one we know.
    pub fn of_gpu(name: &str) -> Option<Peak> {
        GPU_BF16_TFLOPS
            .iter()
            .find(|(part, _)| name.contains(part))
            .map(|&(_, tflops)| Peak {
                tflops,
                source: format!("bf16 dense peak of {name}"),
            })
    }
}

/// Throughput of this rank, reported in windows of steps.
#[derive(Debug)]
pub struct Meter {
    /// Steps not measured at the start: the first steps compile and autotune kernels.
    skip: u64,
    seen: u64,
    window: Window,
}

/// What the steps since the last report did.
#[derive(Debug, Default)]
struct Window {
    first_step: u64,
    steps: u64,
    tokens: usize,
    flops: f64,
    time: Duration,
}

impl Meter {
    pub fn new(skip: u64) -> Meter {
        Meter {
            skip,
            seen: 0,
            window: Window::default(),
        }
    }

    /// Adds step `step` (1-based) of this rank: its tokens, model FLOPs and wall time.
    pub fn record(&mut self, step: u64, tokens: usize, flops: f64, time: Duration) {
        self.seen += 1;
        if self.seen <= self.skip {
            return;
        }
        let w = &mut self.window;
        if w.steps == 0 {
            w.first_step = step;
        }
        w.steps += 1;
        w.tokens += tokens;
        w.flops += flops;
        w.time += time;
    }

    /// One line on the steps since the last report (none if there were none); the next
    /// report starts from here.
    pub fn report(&mut self, last_step: u64, peak: Option<&Peak>) -> Option<String> {
        let w = std::mem::take(&mut self.window);
        if w.steps == 0 {
            return None;
        }
        let seconds = w.time.as_secs_f64().max(1e-9);
        let tflops = w.flops / seconds / 1e12;
        let mfu = match peak {
            Some(peak) => format!(
                "MFU {:.1}% of {:.1} TFLOP/s ({})",
                100.0 * tflops / peak.tflops,
                peak.tflops,
                peak.source
            ),
            None => "MFU unknown: no peak for this device (set cluster.device_peak_tflops)".into(),
        };
        Some(format!(
            "steps {}-{last_step}: {:.0} tokens/s, {:.3} model TFLOP/s on this device, {mfu}",
            w.first_step,
            w.tokens as f64 / seconds,
            tflops,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_have_their_bf16_peak() {
        assert_eq!(Peak::of_gpu("NVIDIA H100 80GB HBM3").unwrap().tflops, 989.4);
        assert_eq!(Peak::of_gpu("NVIDIA H100 PCIe").unwrap().tflops, 756.0);
        assert_eq!(Peak::of_gpu("NVIDIA H200").unwrap().tflops, 989.4);
        assert_eq!(Peak::of_gpu("NVIDIA A100-SXM4-80GB").unwrap().tflops, 312.0);
        assert_eq!(Peak::of_gpu("NVIDIA GeForce RTX 4090"), None);
    }

    #[test]
    fn reports_skip_warmup_and_start_afresh() {
        let peak = Peak {
            tflops: 2.0,
            source: "test".into(),
        };
        let mut meter = Meter::new(2);
        for step in 1..=4 {
            // The skipped steps are slow (compilation); they must not count.
            let time = Duration::from_secs(if step <= 2 { 100 } else { 1 });
            meter.record(step, 1000, 1e12, time);
        }
        let line = meter.report(4, Some(&peak)).unwrap();
        assert_eq!(
            line,
            "steps 3-4: 1000 tokens/s, 1.000 model TFLOP/s on this device, MFU 50.0% of 2.0 TFLOP/s (test)"
        );
        assert_eq!(
            meter.report(4, Some(&peak)),
            None,
            "nothing since the last report"
        );
        meter.record(5, 500, 2e12, Duration::from_secs(2));
        let line = meter.report(5, None).unwrap();
        assert!(
            line.starts_with("steps 5-5: 250 tokens/s, 1.000 model TFLOP/s"),
            "{line}"
        );
        assert!(line.contains("set cluster.device_peak_tflops"), "{line}");
    }
}
