//! `bccp prepare`: split an image folder into clean Monday data and corrupted Tuesday data.
//!
//! Output layout (all paths in the manifests are relative to the output folder):
//! ```text
//! OUT/monday/<class>/<path>            clean copies (Monday)
//! OUT/tuesday_original/<class>/<path>  clean copies of Tuesday's images
//! OUT/tuesday/<class>/<path>           Tuesday's images, corrupted (PNG)
//! OUT/monday.jsonl, OUT/tuesday.jsonl  manifests; Tuesday's ids continue after Monday's
//! OUT/dataset.json                     class names and the parameters of the run
//! ```
//! `<path>` is the image's path below its class folder in the source, sub-folders included.
//! The whole folder is built in a staging sibling and renamed into place at the end, so an
//! interrupted or failed run leaves nothing behind. The same seed gives the same bytes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageEncoder, Pixel};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::corrupt::{corrupt, Corruption};
use super::decode::{decode_bytes, read_image_file};
use super::error::{DataError, Result};
use super::manifest::{to_jsonl, Day, Record};
use super::scan::{ImageFolder, ImageItem, SkipCount};
use crate::fsutil::{is_absent_or_empty, StagedDir};
use crate::hash::sha256_hex;
use crate::progress::Progress;
use crate::rng::Rng;

/// Parameters of `prepare`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub source: PathBuf,
    pub out: PathBuf,
    /// Share of each class that goes to Monday, in (0, 1).
    pub split: f64,
    pub corruption: Corruption,
    pub seed: u64,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// Skip unreadable images (reported in the summary) instead of failing.
    pub skip_bad: bool,
    /// Monday's date as Unix seconds at midnight UTC; Tuesday is the next day.
    pub monday_start: i64,
}

/// The dataset description written to `OUT/dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub classes: Vec<String>,
    pub source: String,
    pub split: f64,
    pub corruption: String,
    pub seed: u64,
    pub monday_per_class: Vec<usize>,
    pub tuesday_per_class: Vec<usize>,
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub info: DatasetInfo,
    /// Images skipped with `skip_bad`: the file and why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Files in class folders ignored because their extension is not an image's.
    pub ignored_files: usize,
    /// Entries of the source not taken as images, counted per class and reason
    /// ([`ImageFolder::skipped_summary`]; includes the `ignored_files`).
    pub scan_skipped: Vec<SkipCount>,
}

/// File name of the dataset description inside a prepared folder.
pub const DATASET_INFO_FILE: &str = "dataset.json";

/// Splits each class: shuffles its items with a per-class stream of `seed` and gives the first
/// `round(n · split)` to Monday. Returns (monday, tuesday) indices into `items`, each sorted.
pub fn split_by_class(
    items: &[ImageItem],
    num_classes: usize,
    split: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, item) in items.iter().enumerate() {
        by_class[item.target].push(i);
    }
    let (mut monday, mut tuesday) = (Vec::new(), Vec::new());
    for (class, mut indices) in by_class.into_iter().enumerate() {
        Rng::derive(seed, class as u64).shuffle(&mut indices);
        let n_monday = ((indices.len() as f64) * split).round() as usize;
        monday.extend_from_slice(&indices[..n_monday]);
        tuesday.extend_from_slice(&indices[n_monday..]);
    }
    monday.sort_unstable();
    tuesday.sort_unstable();
    (monday, tuesday)
}

/// Relative path of a corrupted image: the original name if it is a PNG, else `.png` added.
fn corrupted_name(rel: &Path) -> PathBuf {
    let is_png = rel
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        rel.to_path_buf()
    } else {
        let mut name = rel.as_os_str().to_owned();
        name.push(".png");
        PathBuf::from(name)
    }
}

fn slash_path(day_dir: &str, rel: &Path) -> String {
    let parts: Vec<_> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    format!("{day_dir}/{}", parts.join("/"))
}

/// Encodes an 8-bit image buffer as PNG.
fn encode_png<P: Pixel<Subpixel = u8>>(
    img: &ImageBuffer<P, Vec<u8>>,
    color: image::ExtendedColorType,
) -> image::ImageResult<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        color,
    )?;
    Ok(out)
}

/// Corrupts a decoded image and returns the PNG bytes, keeping grey images grey and alpha
/// where the source had it.
fn corrupt_to_png(
    img: DynamicImage,
    kind: Corruption,
    rng: &mut Rng,
) -> image::ImageResult<Vec<u8>> {
    let color = img.color();
    match (color.has_color(), color.has_alpha()) {
        (false, false) => {
            let mut buf = img.into_luma8();
            corrupt(&mut buf, kind, rng);
            encode_png(&buf, image::ExtendedColorType::L8)
        }
        (_, true) => {
            let mut buf = img.into_rgba8();
            corrupt(&mut buf, kind, rng);
            encode_png(&buf, image::ExtendedColorType::Rgba8)
        }
        (true, false) => {
            let mut buf = img.into_rgb8();
            corrupt(&mut buf, kind, rng);
            encode_png(&buf, image::ExtendedColorType::Rgb8)
        }
    }
}

/// Refuses an output that is the source, inside it, or holds it.
fn check_disjoint(source: &Path, out: &Path) -> Result<()> {
    let source = std::fs::canonicalize(source).map_err(|e| DataError::io(source, e))?;
    let out_abs = match std::fs::canonicalize(out) {
        Ok(p) => p,
        Err(_) => {
            let parent = out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            match std::fs::canonicalize(parent) {
                Ok(p) => p.join(out.file_name().unwrap_or_default()),
                Err(_) => return Ok(()), // parent missing: cannot overlap an existing source
            }
        }
    };
    if out_abs.starts_with(&source) || source.starts_with(&out_abs) {
        return Err(DataError::invalid(
            "--out",
            out.display(),
            format!(
                "the output must not be, contain or lie inside the source {}",
                source.display()
            ),
        ));
    }
    Ok(())
}

/// Stream ids of the corruption generators, separate from the per-class split streams.
const CORRUPTION_STREAM: u64 = 1 << 40;
/// Stream ids of the arrival orders of the two days.
const ARRIVAL_STREAM: u64 = 1 << 41;

enum Outcome {
    /// The hex SHA-256 of the day's image as written.
    Written(String),
    Skipped(PathBuf, String),
}

/// Runs `prepare`; `progress` advances once per image.
pub fn prepare(opts: &PrepareOptions, progress: &Progress) -> Result<PrepareSummary> {
    if !(opts.split > 0.0 && opts.split < 1.0) {
        return Err(DataError::invalid(
            "--split",
            opts.split,
            "a number strictly between 0 and 1",
        ));
    }
    let folder = ImageFolder::scan(&opts.source)?;
    check_disjoint(&opts.source, &opts.out)?;
    if !opts.force && !is_absent_or_empty(&opts.out).map_err(|e| DataError::io(&opts.out, e))? {
        return Err(DataError::OutputNotEmpty(opts.out.clone()));
    }
    let (monday, tuesday) =
        split_by_class(&folder.items, folder.classes.len(), opts.split, opts.seed);
    if monday.is_empty() || tuesday.is_empty() {
        return Err(DataError::invalid(
            "--split",
            opts.split,
            format!(
                "it gives Monday {} and Tuesday {} of the {} images; both days need images (try a split nearer 0.5)",
                monday.len(),
                tuesday.len(),
                folder.items.len()
            ),
        ));
    }

    let staged = StagedDir::create(&opts.out).map_err(|e| DataError::io(&opts.out, e))?;
    let root = staged.path().to_path_buf();
    // The folder of every image (every class has one), sub-folders included, in each day.
    let image_dirs: std::collections::BTreeSet<&Path> = folder
        .items
        .iter()
        .filter_map(|item| item.path.parent())
        .collect();
    for day in ["monday", "tuesday_original", "tuesday"] {
        for sub in &image_dirs {
            let dir = root.join(day).join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        }
    }
    let mut seen = HashSet::new();
    for &i in &tuesday {
        let name = corrupted_name(&folder.items[i].path);
        if !seen.insert(name.clone()) {
            return Err(DataError::invalid(
                "image name",
                folder.items[i].path.display(),
                format!(
                    "its corrupted copy would be {} too; rename one of the files",
                    name.display()
                ),
            ));
        }
    }

    progress.start(folder.items.len() as u64, "preparing");
    let process = |i: usize, day: Day| -> Result<Outcome> {
        let rel = &folder.items[i].path;
        let src = folder.root.join(rel);
        let decoded =
            read_image_file(&src).and_then(|bytes| Ok((decode_bytes(&bytes, &src)?, bytes)));
        let (decoded, bytes) = match decoded {
            Ok(img) => img,
            Err(e) if opts.skip_bad && e.is_bad_image() => {
                return Ok(Outcome::Skipped(src, e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let write = |path: PathBuf, data: &[u8]| {
            std::fs::write(&path, data).map_err(|e| DataError::io(&path, e))
        };
        let written = match day {
            Day::Monday => {
                write(root.join("monday").join(rel), &bytes)?;
                sha256_hex(&bytes)
            }
            Day::Tuesday => {
                write(root.join("tuesday_original").join(rel), &bytes)?;
                let corrupted = if opts.corruption == Corruption::None {
                    bytes
                } else {
                    let mut rng = Rng::derive(opts.seed, CORRUPTION_STREAM + i as u64);
                    corrupt_to_png(decoded, opts.corruption, &mut rng).map_err(|e| {
                        DataError::Decode {
                            path: src.clone(),
                            message: format!("cannot encode the corrupted copy: {e}"),
                        }
                    })?
                };
                let name = if opts.corruption == Corruption::None {
                    rel.clone()
                } else {
                    corrupted_name(rel)
                };
                write(root.join("tuesday").join(name), &corrupted)?;
                sha256_hex(&corrupted)
            }
        };
        Ok(Outcome::Written(written))
    };
    let jobs: Vec<(usize, Day)> = monday
        .iter()
        .map(|&i| (i, Day::Monday))
        .chain(tuesday.iter().map(|&i| (i, Day::Tuesday)))
        .collect();
    let outcomes: Vec<Outcome> = jobs
        .par_iter()
        .map(|&(i, day)| {
            let outcome = process(i, day);
            progress.inc(1);
            outcome
        })
        .collect::<Result<_>>()?;
    progress.finish();

    // Every image is in one day only, so its index names its written file.
    let mut hashes: HashMap<usize, String> = HashMap::with_capacity(jobs.len());
    let mut skipped = Vec::new();
    for (&(i, _), outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Outcome::Written(hash) => {
                hashes.insert(i, hash);
            }
            Outcome::Skipped(p, why) => skipped.push((p, why)),
        }
    }

    let mut next_id = 1u64;
    let mut records_for = |indices: &[usize], day: Day| -> Vec<Record> {
        let day_start = opts.monday_start + if day == Day::Tuesday { 86_400 } else { 0 };
        indices
            .iter()
            .filter_map(|&i| Some((i, hashes.get(&i)?)))
            .enumerate()
            .map(|(k, (i, hash))| {
                let item = &folder.items[i];
                let id = next_id;
                next_id += 1;
                let (image_path, original_path) = match day {
                    Day::Monday => (slash_path("monday", &item.path), None),
                    Day::Tuesday => {
                        let name = if opts.corruption == Corruption::None {
                            item.path.clone()
                        } else {
                            corrupted_name(&item.path)
                        };
                        (
                            slash_path("tuesday", &name),
                            Some(slash_path("tuesday_original", &item.path)),
                        )
                    }
                };
                Record {
                    id,
                    timestamp: super::timestamp::format_utc(day_start + k as i64),
                    image_path,
                    target: item.target,
                    day,
                    original_path,
                    sha256: Some(hash.clone()),
                }
            })
            .collect()
    };
    // Images arrive over the day in random class order (seeded), so the first N records of a
    // manifest are a representative sample (the reference's `--monday-num N`).
    let arrival = |indices: &[usize], stream: u64| {
        let mut order = indices.to_vec();
        Rng::derive(opts.seed, ARRIVAL_STREAM + stream).shuffle(&mut order);
        order
    };
    let monday_records = records_for(&arrival(&monday, 0), Day::Monday);
    let tuesday_records = records_for(&arrival(&tuesday, 1), Day::Tuesday);
    let per_class = |records: &[Record]| {
        let mut counts = vec![0; folder.classes.len()];
        for r in records {
            counts[r.target] += 1;
        }
        counts
    };
    let info = DatasetInfo {
        classes: folder.classes.clone(),
        source: opts.source.display().to_string(),
        split: opts.split,
        corruption: opts.corruption.name().to_owned(),
        seed: opts.seed,
        monday_per_class: per_class(&monday_records),
        tuesday_per_class: per_class(&tuesday_records),
    };
    let write_text = |name: &str, text: String| {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))
    };
    write_text("monday.jsonl", to_jsonl(&monday_records))?;
    write_text("tuesday.jsonl", to_jsonl(&tuesday_records))?;
    let info_json = serde_json::to_string_pretty(&info).expect("dataset info serialises") + "\n";
    write_text(DATASET_INFO_FILE, info_json)?;
    staged.commit().map_err(|e| DataError::io(&opts.out, e))?;
    Ok(PrepareSummary {
        info,
        skipped,
        ignored_files: folder.ignored_files(),
        scan_skipped: folder.skipped_summary(),
    })
}

/// Reads `OUT/dataset.json` of a prepared folder.
pub fn read_dataset_info(dir: &Path) -> Result<DatasetInfo> {
    let path = dir.join(DATASET_INFO_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Manifest {
        path,
        line: e.line(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(counts: &[usize]) -> Vec<ImageItem> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(c, &n)| {
                (0..n).map(move |k| ImageItem {
                    path: PathBuf::from(format!("c{c}/{k}.png")),
                    target: c,
                })
            })
            .collect()
    }

    #[test]
    fn split_proportions_and_determinism() {
        let items = items(&[100, 37, 1, 10]);
        let (m, t) = split_by_class(&items, 4, 0.5, 42);
        let count = |idx: &[usize], c| idx.iter().filter(|&&i| items[i].target == c).count();
        assert_eq!(
            [count(&m, 0), count(&m, 1), count(&m, 2), count(&m, 3)],
            [50, 19, 1, 5]
        );
        assert_eq!(
            [count(&t, 0), count(&t, 1), count(&t, 2), count(&t, 3)],
            [50, 18, 0, 5]
        );
        let mut all: Vec<_> = m.iter().chain(&t).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..items.len()).collect::<Vec<_>>());
        assert_eq!(split_by_class(&items, 4, 0.5, 42), (m.clone(), t));
        assert_ne!(split_by_class(&items, 4, 0.5, 43).0, m);
        let (m8, _) = split_by_class(&items, 4, 0.8, 42);
        assert_eq!(count(&m8, 0), 80);
    }

    #[test]
    fn nested_source_keeps_its_sub_folders_and_skips_an_oversized_image() {
        use crate::data::decode::tests::png_declaring;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let images = [
            "cat/a.png",
            "cat/sub/b.png",
            "cat/sub/deep/c.png",
            "dog/e.png",
            "dog/x/d.png",
        ];
        for (k, rel) in images.iter().enumerate() {
            let path = src.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::GrayImage::from_pixel(4, 4, image::Luma([k as u8 * 40]))
                .save(&path)
                .unwrap();
        }
        let bomb = src.join("cat/sub/deep/bomb.png");
        std::fs::write(&bomb, png_declaring(16000, 14464)).unwrap();
        std::fs::write(src.join("dog/notes.txt"), b"x").unwrap();
        let out = dir.path().join("out");
        let opts = PrepareOptions {
            source: src.clone(),
            out: out.clone(),
            split: 0.5,
            corruption: Corruption::RandomLine,
            seed: 1,
            force: false,
            skip_bad: true,
            monday_start: 1_704_067_200,
        };
        let summary = prepare(&opts, &Progress::hidden()).unwrap();
        assert_eq!(summary.skipped.len(), 1);
        assert_eq!(summary.skipped[0].0, bomb);
        assert!(
            summary.skipped[0].1.contains("MAX_IMAGE_PIXELS"),
            "{}",
            summary.skipped[0].1
        );
        assert_eq!(summary.ignored_files, 1);
        assert_eq!(
            summary.scan_skipped,
            vec![SkipCount {
                class: "dog".into(),
                reason: "unsupported extension",
                count: 1
            }]
        );
        let monday = crate::data::read_manifest(&out.join("monday.jsonl")).unwrap();
        let tuesday = crate::data::read_manifest(&out.join("tuesday.jsonl")).unwrap();
        let mut originals: Vec<String> = Vec::new();
        for r in monday.iter().chain(&tuesday) {
            assert!(out.join(&r.image_path).is_file(), "{}", r.image_path);
            let original = match &r.original_path {
                Some(p) => {
                    assert!(out.join(p).is_file(), "{p}");
                    p.strip_prefix("tuesday_original/").unwrap()
                }
                None => r.image_path.strip_prefix("monday/").unwrap(),
            };
            let class = if original.starts_with("cat/") { 0 } else { 1 };
            assert_eq!(r.target, class, "{original}");
            originals.push(original.to_owned());
        }
        originals.sort();
        assert_eq!(originals, images);
    }

    #[test]
    fn corrupted_names() {
        assert_eq!(
            corrupted_name(Path::new("a/x.PNG")),
            PathBuf::from("a/x.PNG")
        );
        assert_eq!(
            corrupted_name(Path::new("a/x.jpg")),
            PathBuf::from("a/x.jpg.png")
        );
        assert_eq!(
            slash_path("tuesday", Path::new("a/x.png")),
            "tuesday/a/x.png"
        );
    }
}
