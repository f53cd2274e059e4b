//! GLUE's tasks as distributed (`glue_data/<TASK>/{train,dev}.tsv`): which columns hold the
//! texts and the label, whether the file has a header, and the metric GLUE reports, so
//! that `--glue-task` (or a directory named after the task) is all a user passes.

use crate::metrics::Metric;

#[derive(Debug, Clone, Copy)]
pub(crate) struct GlueTask {
    pub name: &'static str,
    /// The directory name in the GLUE download (`SST-2`, `STS-B`...).
    pub directory: &'static str,
    pub text: &'static [&'static str],
    pub label: &'static str,
    pub header: bool,
    pub metric: Metric,
    pub regression: bool,
}

const fn task(
    name: &'static str,
    directory: &'static str,
    text: &'static [&'static str],
    label: &'static str,
    metric: Metric,
) -> GlueTask {
    GlueTask {
        name,
        directory,
        text,
        label,
        header: true,
        metric,
        regression: false,
    }
}

pub(crate) const TASKS: &[GlueTask] = &[
    // CoLA's files have no header: source, label, original label, sentence.
    GlueTask {
        header: false,
        ..task("cola", "CoLA", &["3"], "1", Metric::Mcc)
    },
    task("sst2", "SST-2", &["sentence"], "label", Metric::Accuracy),
    task(
        "mrpc",
        "MRPC",
        &["#1 String", "#2 String"],
        "Quality",
        Metric::F1,
    ),
    task(
        "qqp",
        "QQP",
        &["question1", "question2"],
        "is_duplicate",
        Metric::F1,
    ),
    GlueTask {
        regression: true,
        ..task(
            "stsb",
            "STS-B",
            &["sentence1", "sentence2"],
            "score",
            Metric::Pearson,
        )
    },
    task(
        "mnli",
        "MNLI",
        &["sentence1", "sentence2"],
        "gold_label",
        Metric::Accuracy,
    ),
    task(
        "qnli",
        "QNLI",
        &["question", "sentence"],
        "label",
        Metric::Accuracy,
    ),
    task(
        "rte",
        "RTE",
        &["sentence1", "sentence2"],
        "label",
        Metric::Accuracy,
    ),
    task(
        "wnli",
        "WNLI",
        &["sentence1", "sentence2"],
        "label",
        Metric::Accuracy,
    ),
];

/// The task named `name` (`cola`, `sst2`, `sts-b`... in any case, with or without dashes).
pub(crate) fn by_name(name: &str) -> Option<&'static GlueTask> {
    let key: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    TASKS.iter().find(|t| t.name == key)
}

/// The task whose GLUE directory holds `path` (`.../SST-2/train.tsv`), if any.
pub(crate) fn by_directory(path: &std::path::Path) -> Option<&'static GlueTask> {
    let parent = path.parent()?.file_name()?.to_str()?;
    TASKS.iter().find(|t| t.directory == parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_directories() {
        assert_eq!(by_name("STS-B").unwrap().metric, Metric::Pearson);
        assert!(!by_name("cola").unwrap().header);
        assert!(by_name("squad").is_none());
        let path = std::path::Path::new("/data/glue_data/MRPC/train.tsv");
        assert_eq!(by_directory(path).unwrap().name, "mrpc");
        assert!(by_directory(std::path::Path::new("train.tsv")).is_none());
    }
}
