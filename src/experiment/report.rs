//! The experiment's results: `results.csv` (one row per run, read back to resume) and
//! `results.md` (mean ± standard deviation over seeds per cell).

use std::collections::BTreeMap;
use std::path::Path;

use super::error::{ExperimentError, Result};

use crate::registry::metric;

/// The column of the samples the cut-off removed (the run's `removed_by_cutoff`).
pub const REMOVED: &str = "removed";

/// Columns of `results.csv`, in order.
pub const COLUMNS: [&str; 35] = [
    "config",
    "family",
    "user_accuracy",
    "seed",
    "method",
    "sampling",
    "sampling_mode",
    "ratio",
    "cutoff_score",
    "cutoff_percentile",
    "cutoff_action",
    "cutoff_folds",
    "cutoff_scope",
    "cutoff_rounds",
    "relabel_confidence",
    "cutoff_trust_replay",
    "cleanse_features",
    "cleanse_normalise",
    "filter_by",
    "verify_budget",
    "verify_pick",
    metric::TEST_ACCURACY,
    metric::TEST_ACCURACY_MONDAY,
    metric::TEST_ACCURACY_TUESDAY,
    metric::TRAIN_SIZE,
    REMOVED,
    metric::REPLAYED,
    metric::NOISE_PRECISION,
    metric::NOISE_RECALL,
    metric::NOISE_F1,
    metric::NOISE_SCORE_AUC,
    metric::VERIFIED,
    metric::CORRECTED_BY_REVIEW,
    "seconds",
    "error",
];

/// One run: a value (possibly empty) per column of [`COLUMNS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<String>);

impl Row {
    /// The value of `column` ("" when absent).
    pub fn get(&self, column: &str) -> &str {
        COLUMNS
            .iter()
            .position(|c| *c == column)
            .and_then(|i| self.0.get(i))
            .map_or("", String::as_str)
    }

    /// The value of `column` as a number, when it is one.
    pub fn number(&self, column: &str) -> Option<f64> {
        self.get(column).parse().ok()
    }

    /// (config, user accuracy, seed): what identifies a run for resuming.
    pub fn run_key(&self) -> (String, String, String) {
        (
            self.get("config").to_owned(),
            self.get("user_accuracy").to_owned(),
            self.get("seed").to_owned(),
        )
    }
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// The CSV text of `rows` with its header.
pub fn to_csv(rows: &[Row]) -> String {
    let mut out = COLUMNS.join(",") + "\n";
    for row in rows {
        let fields: Vec<String> = row.0.iter().map(|f| quote(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
fn split_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Reads a `results.csv` written by [`to_csv`]; an absent file is no rows.
pub fn read_csv(path: &Path) -> Result<Vec<Row>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(ExperimentError::io("read", path))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    // Files of earlier versions lack columns added since (left empty); a column this version
    // does not know means the file is not ours to extend.
    if let Some(unknown) = header.iter().find(|h| !COLUMNS.contains(h)) {
        return Err(ExperimentError::Results {
            path: path.to_path_buf(),
            message: format!(
                "column `{unknown}` is not one this version of bccp writes; move the file away to start afresh"
            ),
        });
    }
    let source: Vec<Option<usize>> = COLUMNS
        .iter()
        .map(|c| header.iter().position(|h| h == c))
        .collect();
    lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let fields = split_line(l);
            if fields.len() != header.len() {
                return Err(ExperimentError::Results {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: {} fields, expected {}",
                        i + 2,
                        fields.len(),
                        header.len()
                    ),
                });
            }
            Ok(Row(source
                .iter()
                .map(|at| at.map_or_else(String::new, |j| fields[j].clone()))
                .collect()))
        })
        .collect()
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Per configuration (in first-appearance order) and noise level: the rows of that cell.
pub struct Grouped<'a> {
    pub configs: Vec<(String, String)>,
    pub levels: Vec<String>,
    pub cells: BTreeMap<(String, String), Vec<&'a Row>>,
}

/// Noise levels in report order: `clean` first, then by accuracy.
fn level_order(a: &str, b: &str) -> std::cmp::Ordering {
    let v = |s: &str| s.parse::<f64>().unwrap_or(f64::NEG_INFINITY);
    v(a).total_cmp(&v(b))
}

/// Groups `rows` by configuration and noise level.
pub fn group(rows: &[Row]) -> Grouped<'_> {
    let mut configs: Vec<(String, String)> = Vec::new();
    let mut levels: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(String, String), Vec<&Row>> = BTreeMap::new();
    for row in rows {
        let config = row.get("config").to_owned();
        if !configs.iter().any(|(c, _)| *c == config) {
            configs.push((config.clone(), row.get("family").to_owned()));
        }
        let level = row.get("user_accuracy").to_owned();
        if !levels.contains(&level) {
            levels.push(level.clone());
        }
        cells.entry((config, level)).or_default().push(row);
    }
    levels.sort_by(|a, b| level_order(a, b));
    Grouped {
        configs,
        levels,
        cells,
    }
}

impl Grouped<'_> {
    /// Mean ± std of `column` over the cell's runs that have it, with their count.
    pub fn stat(&self, config: &str, level: &str, column: &str) -> Option<(f64, f64, usize)> {
        let rows = self.cells.get(&(config.to_owned(), level.to_owned()))?;
        let values: Vec<f64> = rows.iter().filter_map(|r| r.number(column)).collect();
        (!values.is_empty()).then(|| {
            let (m, s) = mean_std(&values);
            (m, s, values.len())
        })
    }

    /// The error of a cell whose runs all failed.
    fn error(&self, config: &str, level: &str) -> Option<&str> {
        let rows = self.cells.get(&(config.to_owned(), level.to_owned()))?;
        rows.iter()
            .all(|r| !r.get("error").is_empty())
            .then(|| rows[0].get("error"))
    }
}

/// `results.md`: test accuracy and noise detection per cell.
pub fn markdown(rows: &[Row]) -> String {
    let g = group(rows);
    let mut out = String::from("# Experiment results\n\n");
    let seeds = rows
        .iter()
        .map(|r| r.get("seed"))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    out.push_str(&format!(
        "{} runs, {} configurations, {seeds} seed(s). Test accuracy on Monday test ∪ Tuesday test, mean ± standard deviation over seeds; columns are the users' label accuracy (`clean`: true labels).\n\n",
        rows.len(),
        g.configs.len()
    ));
    out.push_str("| configuration | family |");
    for l in &g.levels {
        out.push_str(&format!(" {l} |"));
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---:|".repeat(g.levels.len()));
    out.push('\n');
    for (config, family) in &g.configs {
        out.push_str(&format!("| {config} | {family} |"));
        for l in &g.levels {
            let cell = match (g.stat(config, l, metric::TEST_ACCURACY), g.error(config, l)) {
                (Some((m, s, _)), _) => format!("{m:.4} ± {s:.4}"),
                (None, Some(e)) => e.to_owned(),
                (None, None) => "".to_owned(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    // Per noise level: every figure of every configuration, mean ± std over seeds.
    for level in &g.levels {
        let configs: Vec<&(String, String)> = g
            .configs
            .iter()
            .filter(|(c, _)| g.cells.contains_key(&(c.clone(), level.clone())))
            .collect();
        if configs.is_empty() {
            continue;
        }
        let title = if level == "clean" {
            "true labels".to_owned()
        } else {
            format!("users {level} right")
        };
        out.push_str(&format!(
            "\n## {title}\n\nAccuracy overall and per day (Monday test, Tuesday test); noise detection of the flagged samples as a detector of the wrong labels (precision, recall, F1) and ROC AUC of the method's score; mean ± std over seeds (runs).\n\n\
             | configuration | accuracy | Monday | Tuesday | precision | recall | F1 | AUC | runs |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        for (config, _) in configs {
            let cell = |column: &str| {
                g.stat(config, level, column)
                    .map_or_else(|| "–".to_owned(), |(m, s, _)| format!("{m:.4} ± {s:.4}"))
            };
            let runs = g
                .cells
                .get(&(config.clone(), level.clone()))
                .map_or(0, Vec::len);
            out.push_str(&format!(
                "| {config} | {} | {} | {} | {} | {} | {} | {} | {runs} |\n",
                cell(metric::TEST_ACCURACY),
                cell(metric::TEST_ACCURACY_MONDAY),
                cell(metric::TEST_ACCURACY_TUESDAY),
                cell(metric::NOISE_PRECISION),
                cell(metric::NOISE_RECALL),
                cell(metric::NOISE_F1),
                cell(metric::NOISE_SCORE_AUC),
            ));
        }
    }
    out.push_str(&review_table(&g));
    out
}

/// The simulated reviews' section (empty when no run reviewed): per configuration and noise
/// level, the labels verified, how many of them were wrong, and the accuracy after the cycle.
fn review_table(g: &Grouped<'_>) -> String {
    let mut lines = String::new();
    for (config, _) in &g.configs {
        for level in &g.levels {
            let Some((verified, _, _)) = g.stat(config, level, metric::VERIFIED) else {
                continue;
            };
            let stat = |column: &str| {
                g.stat(config, level, column)
                    .map_or_else(|| "–".to_owned(), |(m, s, _)| format!("{m:.4} ± {s:.4}"))
            };
            let corrected = g
                .stat(config, level, metric::CORRECTED_BY_REVIEW)
                .map_or_else(|| "–".to_owned(), |(m, s, _)| format!("{m:.1} ± {s:.1}"));
            lines.push_str(&format!(
                "| {config} | {level} | {verified:.0} | {corrected} | {} |\n",
                stat(metric::TEST_ACCURACY)
            ));
        }
    }
    if lines.is_empty() {
        return lines;
    }
    format!(
        "\n## Simulated review\n\nLabels a person verified before the cut-off (answered with the true labels, then trusted), how many of them were wrong (corrected), and the accuracy after the cycle; mean ± std over seeds.\n\n\
         | configuration | users right | verified | corrected | accuracy |\n\
         |---|---:|---:|---:|---:|\n{lines}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(config: &str, ua: &str, seed: &str, acc: &str, f1: &str) -> Row {
        let mut r = Row(vec![String::new(); COLUMNS.len()]);
        let mut set = |c: &str, v: &str| {
            let i = COLUMNS.iter().position(|x| *x == c).unwrap();
            r.0[i] = v.to_owned();
        };
        set("config", config);
        set("family", "f");
        set("user_accuracy", ua);
        set("seed", seed);
        set(metric::TEST_ACCURACY, acc);
        set(metric::NOISE_F1, f1);
        r
    }

    #[test]
    fn csv_round_trips_quoted_fields() {
        let rows = vec![
            row("bccp(a,90,drop)", "0.7", "1", "0.5", "0.25"),
            row("say \"hi\"", "clean", "2", "0.75", ""),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, to_csv(&rows)).unwrap();
        assert_eq!(read_csv(&path).unwrap(), rows);
        std::fs::write(&path, "a,b\n").unwrap();
        assert!(read_csv(&path)
            .unwrap_err()
            .to_string()
            .contains("column `a` is not one"));
    }

    #[test]
    fn an_earlier_file_reads_with_the_new_columns_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "seed,config,user_accuracy\n3,\"bccp(a, b)\",0.7\n").unwrap();
        let rows = read_csv(&path).unwrap();
        let mut expected = row("bccp(a, b)", "0.7", "3", "", "");
        let family = COLUMNS.iter().position(|c| *c == "family").unwrap();
        expected.0[family] = String::new();
        assert_eq!(rows, [expected]);
        std::fs::write(&path, "seed,config\n3\n").unwrap();
        assert!(read_csv(&path)
            .unwrap_err()
            .to_string()
            .contains("line 2: 1 fields, expected 2"));
    }

    #[test]
    fn markdown_has_mean_and_std_per_cell() {
        let rows = vec![
            row("none", "0.7", "1", "0.5", ""),
            row("none", "0.7", "2", "0.7", ""),
            row("none", "clean", "1", "0.9", ""),
            row("cl", "0.7", "1", "0.6", "0.5"),
        ];
        let md = markdown(&rows);
        // mean 0.6, sample std of {0.5, 0.7} = 0.1414.
        assert!(
            md.contains("| none | f | 0.9000 ± 0.0000 | 0.6000 ± 0.1414 |"),
            "{md}"
        );
        assert!(
            md.contains("| cl | 0.6000 ± 0.0000 | – | – | – | – | 0.5000 ± 0.0000 | – | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| none | 0.6000 ± 0.1414 | – | – | – | – | – | – | 2 |"),
            "{md}"
        );
        assert!(
            md.contains("## users 0.7 right") && md.contains("## true labels"),
            "{md}"
        );
        assert_eq!(mean_std(&[1.0, 2.0, 3.0]), (2.0, 1.0));
    }

    #[test]
    fn review_section_lists_only_reviewed_cells() {
        let mut reviewed = row("bccp + review flagged@0.05", "0.7", "1", "0.8", "");
        let mut other = row("bccp + review flagged@0.05", "0.7", "2", "0.6", "");
        for (r, corrected) in [(&mut reviewed, "40"), (&mut other, "44")] {
            for (c, v) in [
                (metric::VERIFIED, "50"),
                (metric::CORRECTED_BY_REVIEW, corrected),
            ] {
                let i = COLUMNS.iter().position(|x| *x == c).unwrap();
                r.0[i] = v.to_owned();
            }
        }
        let plain = vec![row("bccp", "0.7", "1", "0.5", "")];
        assert!(!markdown(&plain).contains("Simulated review"));
        let md = markdown(&[plain[0].clone(), reviewed, other]);
        assert!(
            md.contains("| bccp + review flagged@0.05 | 0.7 | 50 | 42.0 ± 2.8 | 0.7000 ± 0.1414 |"),
            "{md}"
        );
        assert!(!md.contains("| bccp | 0.7 | "), "{md}");
    }
}
