//! Validation metrics as GLUE defines them: accuracy, F1 of the positive class (MRPC,
//! QQP), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B).

/// The metric a task is judged by (`--metric`, or the GLUE task's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    Accuracy,
    F1,
    Mcc,
    Pearson,
    Spearman,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::Mcc => "mcc",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
        }
    }

    pub(crate) fn for_regression(self) -> bool {
        matches!(self, Metric::Pearson | Metric::Spearman)
    }
}

/// The metrics of a classifier's predictions against the labels: accuracy, F1 (of class 1
/// with two classes, as GLUE's MRPC and QQP; the mean over classes otherwise) and
/// Matthews correlation (its multi-class form, equal to the binary one with two classes).
pub(crate) fn classification(
    predicted: &[usize],
    labels: &[usize],
    classes: usize,
) -> Vec<(Metric, f64)> {
    assert_eq!(predicted.len(), labels.len());
    let n = labels.len();
    // confusion[truth][prediction]
    let mut confusion = vec![vec![0u64; classes]; classes];
    for (&p, &t) in predicted.iter().zip(labels) {
        confusion[t][p] += 1;
    }
    let correct: u64 = (0..classes).map(|k| confusion[k][k]).sum();
    let accuracy = correct as f64 / n.max(1) as f64;
    let f1_of = |k: usize| {
        let tp = confusion[k][k] as f64;
        let predicted_k: f64 = (0..classes).map(|t| confusion[t][k] as f64).sum();
        let actual_k: f64 = confusion[k].iter().map(|&c| c as f64).sum();
        if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (predicted_k + actual_k)
        }
    };
    let f1 = if classes == 2 {
        f1_of(1)
    } else {
        (0..classes).map(f1_of).sum::<f64>() / classes as f64
    };
    // Gorodkin's R_K: (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)).
    let s = n as f64;
    let c = correct as f64;
    let p: Vec<f64> = (0..classes)
        .map(|k| (0..classes).map(|t| confusion[t][k] as f64).sum())
        .collect();
    let t: Vec<f64> = (0..classes)
        .map(|k| confusion[k].iter().map(|&v| v as f64).sum())
        .collect();
    let pt: f64 = p.iter().zip(&t).map(|(a, b)| a * b).sum();
    let pp: f64 = p.iter().map(|a| a * a).sum();
    let tt: f64 = t.iter().map(|a| a * a).sum();
    let denominator = ((s * s - pp) * (s * s - tt)).sqrt();
    // A constant prediction (or constant labels) has no correlation: 0, as scikit-learn.
    let mcc = if denominator == 0.0 {
        0.0
    } else {
        (c * s - pt) / denominator
    };
    vec![
        (Metric::Accuracy, accuracy),
        (Metric::F1, f1),
        (Metric::Mcc, mcc),
    ]
}

/// Pearson and Spearman correlation of predictions with the targets.
pub(crate) fn regression(predicted: &[f64], targets: &[f64]) -> Vec<(Metric, f64)> {
    vec![
        (Metric::Pearson, pearson(predicted, targets)),
        (
            Metric::Spearman,
            pearson(&ranks(predicted), &ranks(targets)),
        ),
    ]
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    let n = x.len() as f64;
    if x.is_empty() {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// 1-based ranks, ties sharing the mean of their ranks (as scipy's `spearmanr`).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = mean;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(metrics: &[(Metric, f64)], m: Metric) -> f64 {
        metrics.iter().find(|(k, _)| *k == m).unwrap().1
    }

    /// Labels 1 1 1 0 0 0 0 0, predictions 1 1 0 1 0 0 0 0: TP 2, FN 1, FP 1, TN 4.
    /// accuracy 6/8; precision 2/3, recall 2/3, F1 2/3;
    /// MCC = (2*4 - 1*1) / sqrt(3 * 3 * 5 * 5) = 7/15.
    #[test]
    fn binary_metrics_by_hand() {
        let labels = [1, 1, 1, 0, 0, 0, 0, 0];
        let predicted = [1, 1, 0, 1, 0, 0, 0, 0];
        let m = classification(&predicted, &labels, 2);
        assert!((get(&m, Metric::Accuracy) - 0.75).abs() < 1e-12);
        assert!((get(&m, Metric::F1) - 2.0 / 3.0).abs() < 1e-12);
        assert!((get(&m, Metric::Mcc) - 7.0 / 15.0).abs() < 1e-12);
        // All predictions one class: MCC 0, F1 of class 1 is 0.
        let m = classification(&[0; 8], &labels, 2);
        assert_eq!((get(&m, Metric::Mcc), get(&m, Metric::F1)), (0.0, 0.0));
        // Perfect and perfectly wrong.
        assert_eq!(get(&classification(&labels, &labels, 2), Metric::Mcc), 1.0);
        let flipped: Vec<usize> = labels.iter().map(|l| 1 - l).collect();
        assert_eq!(
            get(&classification(&flipped, &labels, 2), Metric::Mcc),
            -1.0
        );
    }

    /// Three classes, labels 0 1 2 0, predictions 0 2 2 0: accuracy 3/4; per-class F1
    /// 1, 0, 2/3 -> macro F1 5/9. MCC: c = 3, s = 4, p = (2, 0, 2), t = (2, 1, 1):
    /// (3*4 - (4 + 0 + 2)) / sqrt((16 - 8) * (16 - 6)) = 6 / sqrt(80).
    #[test]
    fn multi_class_metrics_by_hand() {
        let m = classification(&[0, 2, 2, 0], &[0, 1, 2, 0], 3);
        assert!((get(&m, Metric::Accuracy) - 0.75).abs() < 1e-12);
        assert!((get(&m, Metric::F1) - 5.0 / 9.0).abs() < 1e-12);
        assert!((get(&m, Metric::Mcc) - 6.0 / 80f64.sqrt()).abs() < 1e-12);
    }

    /// x = 1 2 3 4, y = 2 4 5 4: deviations -1.5 -0.5 0.5 1.5 and -1.75 0.25 1.25 0.25,
    /// so Pearson = 3.5 / sqrt(5 * 4.75). Spearman with y's tied ranks 1 2.5 4 2.5
    /// (deviations -1.5 0 1.5 0): Pearson of the ranks = 3 / sqrt(5 * 4.5).
    #[test]
    fn correlations_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [2.0, 4.0, 5.0, 4.0];
        let m = regression(&x, &y);
        assert!((get(&m, Metric::Pearson) - 3.5 / (5.0f64 * 4.75).sqrt()).abs() < 1e-12);
        assert_eq!(ranks(&y), vec![1.0, 2.5, 4.0, 2.5]);
        assert!((get(&m, Metric::Spearman) - 3.0 / (5.0f64 * 4.5).sqrt()).abs() < 1e-12);
        // Monotone but not linear: Spearman 1, Pearson below 1.
        let m = regression(&[1.0, 2.0, 3.0], &[1.0, 10.0, 100.0]);
        assert_eq!(get(&m, Metric::Spearman), 1.0);
        assert!(get(&m, Metric::Pearson) < 0.99);
    }
}
