//! The `bccp` command line: parses and validates arguments, calls the library, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use bccp::backbone;
use bccp::data::{self, Corruption, ImageFolder, PrepareOptions};
use bccp::progress::Progress;

#[derive(Parser, Debug)]
#[command(
    name = "bccp",
    version,
    about = "Clean noisy real-time image data before re-training a classifier"
)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a dataset from another format into an image folder.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Split an image folder into clean Monday and corrupted Tuesday data with manifests.
    Prepare(PrepareArgs),
    /// Summarise an image folder or a prepared Monday/Tuesday dataset.
    Info(InfoArgs),
    /// Embed images with a pretrained backbone into a safetensors file.
    Embed(EmbedArgs),
    /// Print the top ImageNet classes of images (a check that a pretrained model is wired right).
    Classify(ClassifyArgs),
    /// List the backbones of the model zoo.
    Models,
    /// The k closest candidates of every query embedding (L1, L2 or cosine).
    Closest(ClosestArgs),
    /// Choose images to replay from the reuse buffer (none, random, closest pairs).
    Sample(SampleArgs),
    /// The full run: embed, replay, Bayesian cut-off, train, evaluate, register.
    Train(TrainArgs),
    /// Classify images with a registered run.
    Predict(PredictArgs),
    /// List registered runs with their key metrics.
    Runs(RunsArgs),
    /// Find likely wrong labels with confident learning (cleanlab's find_label_issues).
    LabelIssues(LabelIssuesArgs),
    /// Run a grid of train runs from a TOML file; write results.csv, results.md and charts.
    Experiment(ExperimentArgs),
}

#[derive(Args, Debug)]
struct LabelIssuesArgs {
    /// Out-of-sample predicted probabilities, .npy [samples, classes] (with --labels).
    #[arg(long, requires = "labels", conflicts_with = "dataset")]
    pred_probs: Option<PathBuf>,
    /// Given labels, .npy [samples] of class indices (with --pred-probs).
    #[arg(long, requires = "pred_probs")]
    labels: Option<PathBuf>,
    /// Or: an image folder ROOT/<class>/<file> or a JSON Lines manifest; bccp embeds it and
    /// computes K-fold probabilities itself.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// prune_by_noise_rate, prune_by_class, both, confident_learning or predicted_neq_given.
    #[arg(long, default_value = "prune_by_noise_rate")]
    filter_by: bccp::baselines::FilterBy,
    /// Output: a boolean mask .npy (with --pred-probs) or a JSON Lines report (with --dataset).
    #[arg(long)]
    out: PathBuf,
    /// The backbone that embeds --dataset.
    #[command(flatten)]
    net: BackboneArgs,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Embedding cache folder (default: BCCP_CACHE, else BCCP_HOME/cache, else ~/.cache/bccp).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// The backbone flags `train` and `label-issues` share.
#[derive(Args, Debug)]
struct BackboneArgs {
    /// Backbone from the zoo.
    #[arg(long, default_value = "mobilenet_v2")]
    backbone: String,
    /// Local backbone weights instead of the zoo's source.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input size override (e.g. 64 for 28×28 images).
    #[arg(long)]
    image_size: Option<u32>,
    /// Never touch the network for hub weights.
    #[arg(long)]
    offline: bool,
}

#[derive(Args, Debug)]
struct ExperimentArgs {
    /// The experiment file (see experiments/fashion-mnist.toml).
    #[arg(long)]
    config: PathBuf,
    /// Output folder (default: the file's `out`, else runs/experiments/<file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only write results.md and the charts from the existing results.csv.
    #[arg(long)]
    report_only: bool,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// A folder made by `bccp prepare`.
    #[arg(short = 'd', long)]
    dataset: PathBuf,
    /// monday (train and test on Monday) or tuesday (train on Tuesday + replay, test on both).
    #[arg(short = 't', long, default_value = "monday", value_parser = ["monday", "tuesday"])]
    target_day: String,
    /// ground_truth or user_feedback (Tuesday labels right with probability --user-accuracy).
    #[arg(short = 'l', long, default_value = "ground_truth", value_parser = ["ground_truth", "user_feedback"])]
    label: String,
    /// Probability that a user's label is right.
    #[arg(long, default_value_t = 0.7)]
    user_accuracy: f64,
    /// Bayesian cut-off: Y (the same as --method bccp) or N.
    #[arg(short = 'b', long, value_parser = ["Y", "N", "y", "n"])]
    bayesian_cut_off: Option<String>,
    /// Noisy-label handling: none, bccp (the Bayesian cut-off), cleanlab (drop what confident
    /// learning flags) or anl_ce (train with the ANL-CE loss).
    #[arg(long)]
    method: Option<bccp::cleanse::Method>,
    /// Confident learning's filter: prune_by_noise_rate, prune_by_class, both,
    /// confident_learning or predicted_neq_given.
    #[arg(long, default_value = "prune_by_noise_rate")]
    filter_by: bccp::baselines::FilterBy,
    /// Folds of confident learning's cross-validated probabilities.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// none, random, l1_norm, l2_norm or cosine_similarity.
    #[arg(short = 's', long, default_value = "none")]
    sampling_type: bccp::sampling::Sampling,
    /// Closest pairs: faithful (the reference's procedure) or buffer (ours).
    #[arg(long, default_value = "buffer")]
    sampling_mode: bccp::sampling::PairMode,
    /// Use the first N records of Monday's manifest.
    #[arg(long)]
    monday_num: Option<usize>,
    /// Use the first N records of Tuesday's manifest (required for --target-day tuesday).
    #[arg(long)]
    tuesday_num: Option<usize>,
    /// Share of the reuse buffer to replay (required when sampling is not none).
    #[arg(short = 'r', long)]
    ratio: Option<f64>,
    /// Name of the run in the registry.
    #[arg(long, default_value = "bccp")]
    model_name: String,
    #[command(flatten)]
    net: BackboneArgs,
    /// Cut-off score: label_prob_mean (default), margin, knn_disagreement, logit_sum_var (the reference's), label_prob_var, entropy, bald.
    #[arg(long, default_value = "label_prob_mean")]
    cutoff_score: bccp::cutoff::Score,
    /// Percentile above which samples are cut (0–100), or auto (the estimated noise share).
    #[arg(long, default_value = "90")]
    cutoff_percentile: bccp::cutoff::Percentile,
    /// drop or relabel the cut samples.
    #[arg(long, default_value = "drop")]
    cutoff_action: bccp::cutoff::Action,
    /// MC-dropout passes.
    #[arg(long, default_value_t = 10)]
    mc_passes: usize,
    /// 1: score samples with the MC-dropout head trained on them (the reference's); K ≥ 2:
    /// out of sample, each fold scored by a head trained on the other K − 1.
    #[arg(long, default_value_t = 1)]
    cutoff_folds: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// head (a linear probe on frozen, cached features) or full (back-propagate through the
    /// backbone; mobilenet_v2 and efficientnet_lite0).
    #[arg(long, default_value = "head")]
    finetune: bccp::train::finetune::Finetune,
    /// Learning rate of the backbone with --finetune full.
    #[arg(long, default_value_t = 1e-4)]
    backbone_lr: f64,
    /// ce or anl_ce.
    #[arg(long, default_value = "ce")]
    loss: bccp::train::Loss,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Registry folder.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Embedding cache folder (default: BCCP_CACHE, else BCCP_HOME/cache, else ~/.cache/bccp).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not use the embedding cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args, Debug)]
struct PredictArgs {
    /// A registered run: NAME (latest version) or NAME:VERSION.
    #[arg(long)]
    model: String,
    /// Registry folder.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct RunsArgs {
    /// Registry folder.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
}

#[derive(Args, Debug)]
struct ClosestArgs {
    /// Embedding file of the queries (`embeddings` f32 [Q, D], `targets` i64 [Q]).
    #[arg(long)]
    queries: PathBuf,
    /// Embedding file of the candidates (`embeddings` f32 [N, D], `targets` i64 [N]).
    #[arg(long)]
    candidates: PathBuf,
    /// l1, l2 or cosine.
    #[arg(long)]
    metric: bccp::distance::Metric,
    /// Neighbours per query.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Only candidates whose target differs from the query's.
    #[arg(long)]
    other_class: bool,
    /// Output safetensors file (`indices` i64 [Q, k], `values` f32 [Q, k]).
    #[arg(long)]
    out: PathBuf,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// Embedding file of the reuse buffer (Monday's training images).
    #[arg(long)]
    buffer: PathBuf,
    /// none, random, l1_norm, l2_norm or cosine_similarity.
    #[arg(long)]
    sampling: bccp::sampling::Sampling,
    /// Share of the buffer to replay, in [0, 1].
    #[arg(long)]
    ratio: f64,
    /// Closest pairs: faithful (the reference's procedure) or buffer (whole-buffer neighbours).
    #[arg(long, default_value = "buffer")]
    mode: bccp::sampling::PairMode,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output JSON Lines file: one chosen image per line (index, path, target, partner, value).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// IDX files (MNIST, Fashion-MNIST; raw or gzip) → OUT/<class>/<index>.png.
    Idx(IdxArgs),
}

#[derive(Args, Debug)]
struct IdxArgs {
    /// IDX file of images (u8, [count, rows, cols]).
    #[arg(long)]
    images: PathBuf,
    /// IDX file of labels (u8, [count]).
    #[arg(long)]
    labels: PathBuf,
    /// Class names in label order, comma-separated (label k → folder of the k-th name).
    #[arg(long, value_delimiter = ',', required = true)]
    classes: Vec<String>,
    /// Output image folder.
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// Source image folder ROOT/<class>/<file>.
    #[arg(long)]
    source: PathBuf,
    /// Output folder (monday/, tuesday_original/, tuesday/, monday.jsonl, tuesday.jsonl).
    #[arg(long)]
    out: PathBuf,
    /// Share of each class that goes to Monday, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.5)]
    split: f64,
    /// Corruption of Tuesday's images: mixed, random_boxes, mosaic, random_line or none.
    #[arg(long, default_value = "mixed")]
    corruption: Corruption,
    /// Seed of the split and the corruptions; the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
    /// Skip images that cannot be decoded (with a warning and a count) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Monday's date (YYYY-MM-DD, UTC) for the manifests' timestamps; Tuesday is the next day.
    #[arg(long, default_value = "2024-01-01")]
    monday_date: String,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// An image folder, or the output of `bccp prepare`.
    dir: PathBuf,
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Backbone name from the zoo (`bccp models` lists them).
    #[arg(long)]
    model: String,
    /// Local weights (.safetensors) instead of the zoo's source.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Never touch the network for hub weights (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args, Debug)]
struct EmbedArgs {
    /// An image folder ROOT/<class>/<file>, or a JSON Lines manifest (paths relative to it).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Output safetensors file (`embeddings` f32 [N, D], `targets` i64 [N]).
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Recompute every embedding and leave the cache untouched.
    #[arg(long)]
    no_cache: bool,
    /// Cache folder (default: BCCP_CACHE, else BCCP_HOME/cache, else ~/.cache/bccp).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Skip images that cannot be decoded (with a warning and a count) instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

#[derive(Args, Debug)]
struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Number of classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

fn progress(quiet: bool) -> Progress {
    if quiet {
        Progress::hidden()
    } else {
        Progress::stderr()
    }
}

fn run_import_idx(args: IdxArgs, quiet: bool) -> Result<()> {
    let opts = data::idx::IdxImport {
        images: args.images,
        labels: args.labels,
        classes: args.classes,
        out: args.out,
        force: args.force,
    };
    let started = std::time::Instant::now();
    let per_class = data::idx::import_idx(&opts, &progress(quiet))?;
    println!(
        "imported {} images into {} in {:.1}s",
        per_class.iter().sum::<usize>(),
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    for (name, n) in opts.classes.iter().zip(per_class) {
        println!("  {name:<20} {n}");
    }
    Ok(())
}

fn run_prepare(args: PrepareArgs, quiet: bool) -> Result<()> {
    let monday_start = data::timestamp::parse_date(&args.monday_date).with_context(|| {
        format!(
            "invalid --monday-date {:?}: expected a date YYYY-MM-DD",
            args.monday_date
        )
    })?;
    let opts = PrepareOptions {
        source: args.source,
        out: args.out,
        split: args.split,
        corruption: args.corruption,
        seed: args.seed,
        force: args.force,
        skip_bad: args.skip_bad,
        monday_start,
    };
    let started = std::time::Instant::now();
    let summary = data::prepare(&opts, &progress(quiet))?;
    for (path, why) in &summary.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let info = &summary.info;
    let (monday, tuesday): (usize, usize) = (
        info.monday_per_class.iter().sum(),
        info.tuesday_per_class.iter().sum(),
    );
    println!(
        "prepared {} in {:.1}s: {monday} Monday and {tuesday} Tuesday images, {} classes, corruption {}, seed {}",
        opts.out.display(),
        started.elapsed().as_secs_f64(),
        info.classes.len(),
        info.corruption,
        info.seed
    );
    if !summary.skipped.is_empty() {
        eprintln!(
            "warning: {} unreadable images skipped",
            summary.skipped.len()
        );
    }
    if summary.ignored_files > 0 {
        eprintln!(
            "note: {} files with non-image extensions were ignored",
            summary.ignored_files
        );
    }
    Ok(())
}

fn run_info(args: InfoArgs) -> Result<()> {
    if args.dir.join(data::prepare::DATASET_INFO_FILE).is_file() {
        let info = data::prepare::read_dataset_info(&args.dir)?;
        let monday = data::read_manifest(&args.dir.join("monday.jsonl"))?;
        let tuesday = data::read_manifest(&args.dir.join("tuesday.jsonl"))?;
        println!(
            "prepared dataset {} (source {}, split {}, corruption {}, seed {})",
            args.dir.display(),
            info.source,
            info.split,
            info.corruption,
            info.seed
        );
        println!("{:<20} {:>8} {:>8}", "class", "monday", "tuesday");
        let mut counts = vec![(0usize, 0usize); info.classes.len()];
        for r in &monday {
            counts
                .get_mut(r.target)
                .with_context(|| {
                    format!(
                        "monday.jsonl: record {} has target {} but the dataset has {} classes",
                        r.id,
                        r.target,
                        info.classes.len()
                    )
                })?
                .0 += 1;
        }
        for r in &tuesday {
            counts
                .get_mut(r.target)
                .with_context(|| {
                    format!(
                        "tuesday.jsonl: record {} has target {} but the dataset has {} classes",
                        r.id,
                        r.target,
                        info.classes.len()
                    )
                })?
                .1 += 1;
        }
        for (name, (m, t)) in info.classes.iter().zip(&counts) {
            println!("{name:<20} {m:>8} {t:>8}");
        }
        println!("{:<20} {:>8} {:>8}", "total", monday.len(), tuesday.len());
    } else {
        let folder = ImageFolder::scan(&args.dir)?;
        println!(
            "image folder {} with {} classes",
            args.dir.display(),
            folder.classes.len()
        );
        for (name, n) in folder.classes.iter().zip(folder.class_counts()) {
            println!("{name:<20} {n:>8}");
        }
        println!("{:<20} {:>8}", "total", folder.items.len());
    }
    Ok(())
}

/// The zoo entry, its weights file and the device of a model command.
fn resolve_model(
    args: &ModelArgs,
) -> Result<(backbone::zoo::BackboneSpec, PathBuf, candle_core::Device)> {
    let spec = backbone::zoo::find(&args.model)?;
    let weights = backbone::resolve_weights(&spec, args.weights.as_deref(), args.offline)?;
    let device = bccp::device::parse_device(&args.device)?;
    Ok((spec, weights, device))
}

fn run_embed(args: EmbedArgs, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch must be 1 or more");
    let (spec, weights, device) = resolve_model(&args.model)?;
    let list = backbone::embed::ImageList::from_path(&args.data)?;
    anyhow::ensure!(
        !list.files.is_empty(),
        "{} holds no images",
        args.data.display()
    );
    let cache_dir = (!args.no_cache).then(|| {
        args.cache_dir
            .clone()
            .unwrap_or_else(backbone::cache::default_cache_dir)
    });
    let started = std::time::Instant::now();
    let weights_sha256 = backbone::cache::weights_hash(cache_dir.as_deref(), &weights)?;
    let progress = progress(quiet);
    let opts = backbone::embed::EmbedOptions {
        batch: args.batch,
        device: &device,
        skip_bad: args.skip_bad,
        cache_dir: cache_dir.as_deref(),
        progress: &progress,
    };
    let (set, stats) = backbone::embed::embed_images(
        &list,
        &spec.name,
        &weights_sha256,
        &spec.preprocess(),
        spec.embedding_dim,
        || backbone::Backbone::load(&spec, &weights, &device),
        &opts,
    )?;
    set.save(&args.out)?;
    for (path, why) in &stats.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let (n, d) = set.embeddings.dims2()?;
    println!(
        "embedded {n} images with {} ({d}-d) on {:?} in {:.1}s: {} from cache, {} computed{}; wrote {}",
        spec.name,
        device.location(),
        started.elapsed().as_secs_f64(),
        stats.cached,
        stats.computed,
        if stats.skipped.is_empty() { String::new() } else { format!(", {} unreadable skipped", stats.skipped.len()) },
        args.out.display()
    );
    Ok(())
}

fn run_classify(args: ClassifyArgs) -> Result<()> {
    let (spec, weights, device) = resolve_model(&args.model)?;
    let backbone = backbone::Backbone::load(&spec, &weights, &device)?;
    let names = backbone::imagenet::class_names();
    let pre = spec.preprocess();
    let batch = bccp::data::loader::load_batch(&args.images, 0, &pre, false)?;
    let x = batch.to_tensor(&pre, &device)?;
    let logits = backbone.logits(&x)?.with_context(|| {
        format!(
            "model {} has no classifier head; classify needs one (e.g. efficientnet_lite0)",
            spec.name
        )
    })?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_device(&candle_core::Device::Cpu)?;
    for (path, row) in args.images.iter().zip(probs.to_vec2::<f32>()?) {
        println!("{}", path.display());
        for (class, p) in backbone::imagenet::top_k(&row, args.top) {
            let name = names.get(class).copied().unwrap_or("?");
            println!("  {:>5.1}%  {class:>4}  {name}", 100.0 * p);
        }
    }
    Ok(())
}

fn run_closest(args: ClosestArgs) -> Result<()> {
    use backbone::embed::EmbeddingSet;
    let device = bccp::device::parse_device(&args.device)?;
    let queries = EmbeddingSet::load(&args.queries)?;
    let candidates = EmbeddingSet::load(&args.candidates)?;
    let started = std::time::Instant::now();
    let search = bccp::distance::Search {
        metric: args.metric,
        k: args.k,
        other_class: args
            .other_class
            .then_some((queries.targets.as_slice(), candidates.targets.as_slice())),
    };
    let neighbors = bccp::distance::search(
        &queries.embeddings.to_device(&device)?,
        &candidates.embeddings.to_device(&device)?,
        &search,
    )
    .with_context(|| {
        format!(
            "searching {} against {}",
            args.queries.display(),
            args.candidates.display()
        )
    })?;
    let (indices, values) = neighbors.to_tensors(&candle_core::Device::Cpu)?;
    let tensors = std::collections::HashMap::from([
        ("indices".to_owned(), indices),
        ("values".to_owned(), values),
    ]);
    let tmp = args.out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let empty = neighbors.indices.iter().filter(|&&i| i < 0).count();
    println!(
        "found the {} closest of {} candidates for {} queries ({:?}) in {:.2}s{}; wrote {}",
        args.k,
        candidates.targets.len(),
        queries.targets.len(),
        args.metric,
        started.elapsed().as_secs_f64(),
        if empty > 0 {
            format!(", {empty} slots without an eligible candidate (index -1)")
        } else {
            String::new()
        },
        args.out.display()
    );
    Ok(())
}

fn run_sample(args: SampleArgs) -> Result<()> {
    let set = backbone::embed::EmbeddingSet::load(&args.buffer)?;
    let (n, dim) = set.embeddings.dims2()?;
    let embeddings = set.embeddings.flatten_all()?.to_vec1::<f32>()?;
    let buffer = bccp::sampling::ReuseBuffer {
        embeddings: &embeddings,
        dim,
        targets: &set.targets,
    };
    let chosen = bccp::sampling::select(&buffer, args.sampling, args.ratio, args.mode, args.seed)?;
    let mut text = String::new();
    for s in &chosen {
        let line = serde_json::json!({
            "index": s.index,
            "path": set.paths.get(s.index),
            "target": set.targets[s.index],
            "partner": s.partner,
            "value": s.value,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    bccp::fsutil::write_atomic(&args.out, text.as_bytes())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "selected {} of {n} buffer images; wrote {}",
        chosen.len(),
        args.out.display()
    );
    Ok(())
}

/// The method from `-b` (the reference's flag) and `--method`, refusing contradictions.
fn train_method(
    cut_off: Option<&str>,
    method: Option<bccp::cleanse::Method>,
) -> Result<bccp::cleanse::Method> {
    use bccp::cleanse::Method;
    let cut_off = cut_off.map(|b| b.eq_ignore_ascii_case("y"));
    match (cut_off, method) {
        (Some(true), Some(m)) if m != Method::Bccp => anyhow::bail!(
            "-b Y is the bccp method's cut-off; it cannot be combined with --method {}",
            m.name()
        ),
        (Some(false), Some(Method::Bccp)) => {
            anyhow::bail!("--method bccp is the Bayesian cut-off; it cannot be combined with -b N")
        }
        (Some(true), _) => Ok(Method::Bccp),
        (_, Some(m)) => Ok(m),
        _ => Ok(Method::None),
    }
}

fn run_train(args: TrainArgs, quiet: bool) -> Result<()> {
    use bccp::data::Day;
    use bccp::pipeline::{LabelSource, RunConfig};
    if args.sampling_type != bccp::sampling::Sampling::None && args.ratio.is_none() {
        anyhow::bail!("--ratio is required when --sampling-type is not none");
    }
    let method = train_method(args.bayesian_cut_off.as_deref(), args.method)?;
    let cfg = RunConfig {
        dataset: args.dataset,
        target_day: if args.target_day == "tuesday" {
            Day::Tuesday
        } else {
            Day::Monday
        },
        label: if args.label == "user_feedback" {
            LabelSource::UserFeedback
        } else {
            LabelSource::GroundTruth
        },
        user_accuracy: args.user_accuracy,
        sampling: args.sampling_type,
        sampling_mode: args.sampling_mode,
        ratio: args.ratio.unwrap_or(0.0),
        monday_num: args.monday_num,
        tuesday_num: args.tuesday_num,
        model_name: args.model_name,
        backbone: args.net.backbone,
        weights: args.net.weights,
        image_size: args.net.image_size,
        cleanse: bccp::cleanse::CleanseConfig {
            method,
            cutoff_score: args.cutoff_score,
            cutoff_percentile: args.cutoff_percentile,
            cutoff_action: args.cutoff_action,
            mc_passes: args.mc_passes,
            cutoff_folds: args.cutoff_folds,
            filter_by: args.filter_by,
            folds: args.folds,
        },
        finetune: args.finetune,
        backbone_lr: args.backbone_lr,
        train: bccp::train::TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr: args.lr,
            loss: args.loss,
            seed: args.seed,
            ..Default::default()
        },
        device: bccp::device::parse_device(&args.device)?,
        cache_dir: (!args.no_cache).then(|| {
            args.cache_dir
                .unwrap_or_else(backbone::cache::default_cache_dir)
        }),
        runs_dir: args.runs_dir,
        offline: args.net.offline,
    };
    bccp::pipeline::validate(&cfg)?;
    println!("==================== configuration ====================");
    println!("dataset            {}", cfg.dataset.display());
    println!("target day         {}", cfg.target_day.as_str());
    println!(
        "label              {:?} (user accuracy {})",
        cfg.label, cfg.user_accuracy
    );
    let c = &cfg.cleanse;
    println!("method             {}", c.method.name());
    println!(
        "bayesian cut-off   {} (score {}, percentile {:?}, action {}, {} passes)",
        if c.method == bccp::cleanse::Method::Bccp {
            "Y"
        } else {
            "N"
        },
        c.cutoff_score.name(),
        c.cutoff_percentile,
        c.cutoff_action.name(),
        c.mc_passes
    );
    if c.method == bccp::cleanse::Method::Cleanlab {
        println!(
            "confident learning filter_by {}, {}-fold probabilities",
            c.filter_by.name(),
            c.folds
        );
    }
    println!(
        "sampling           {:?} ({:?}), ratio {}",
        cfg.sampling, cfg.sampling_mode, cfg.ratio
    );
    println!(
        "monday / tuesday   {:?} / {:?} records",
        cfg.monday_num, cfg.tuesday_num
    );
    println!(
        "backbone           {} (image size {:?}) on {:?}",
        cfg.backbone,
        cfg.image_size,
        cfg.device.location()
    );
    println!(
        "training           {} epochs, batch {}, lr {}, loss {}, seed {}",
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.train.loss.name(),
        cfg.train.seed
    );
    match cfg.finetune {
        bccp::train::finetune::Finetune::Head => {
            println!("fine-tuning        head (linear probe on cached features)")
        }
        bccp::train::finetune::Finetune::Full => println!(
            "fine-tuning        full (backbone lr {}, batch-norm statistics frozen)",
            cfg.backbone_lr
        ),
    }
    println!("=======================================================");
    let outcome = bccp::pipeline::run(&cfg, &progress(quiet))?;
    let m = &outcome.metrics;
    println!("\n| metric | value |\n|---|---|");
    for key in [
        "test_accuracy",
        "test_accuracy_monday",
        "test_accuracy_tuesday",
        "train_size",
        "replayed",
        "removed_by_cutoff",
        "relabelled_by_cutoff",
        "noisy_labels",
        "noise_precision",
        "noise_recall",
        "noise_f1",
        "noise_score_auc",
    ] {
        if let Some(v) = m.get(key) {
            match v.as_f64() {
                Some(f) if v.is_f64() => println!("| {key} | {f:.4} |"),
                _ => println!("| {key} | {v} |"),
            }
        }
    }
    if let Some(total) = m["seconds"].get("total").and_then(|v| v.as_f64()) {
        println!("| seconds | {total:.1} |");
    }
    println!(
        "\nregistered {}:{} in {}",
        outcome.run.name,
        outcome.run.version,
        outcome.run.path.display()
    );
    Ok(())
}

fn run_predict(args: PredictArgs) -> Result<()> {
    let run = bccp::registry::resolve(&args.runs_dir, &args.model)?;
    let params = bccp::registry::read_json(&run, "params.json")?;
    let classes: Vec<String> =
        serde_json::from_value(bccp::registry::read_json(&run, "labels.json")?)?;
    let device = bccp::device::parse_device(&args.device)?;
    let name = params["backbone"]
        .as_str()
        .context("params.json has no backbone")?;
    let spec = backbone::zoo::find(name)?;
    let weights = PathBuf::from(
        params["weights"]
            .as_str()
            .context("params.json has no weights")?,
    );
    let tensors = candle_core::safetensors::load(run.path.join("model.safetensors"), &device)?;
    // A fine-tuned run carries its backbone; a linear probe uses the pretrained weights.
    let model = match backbone::Backbone::from_tuned(&spec, &tensors, &device)? {
        Some(tuned) => tuned,
        None => backbone::Backbone::load(&spec, &weights, &device)?,
    };
    let get = |k: &str| {
        tensors
            .get(k)
            .cloned()
            .with_context(|| format!("{} has no {k}", run.path.display()))
    };
    let head = bccp::train::Head::from_tensors(get("head.weight")?, get("head.bias")?)?;
    let pre = spec.preprocess_at(params["image_size"].as_u64().map(|s| s as u32))?;
    let batch = bccp::data::loader::load_batch(&args.images, 0, &pre, false)?;
    let features = model.embed(&batch.to_tensor(&pre, &device)?)?;
    let probs = candle_nn::ops::softmax_last_dim(&head.logits(&features)?)?
        .to_device(&candle_core::Device::Cpu)?;
    for (path, row) in args.images.iter().zip(probs.to_vec2::<f32>()?) {
        let (class, p) = backbone::imagenet::top_k(&row, 1)[0];
        println!(
            "{}\t{}\t{:.3}",
            path.display(),
            classes.get(class).map_or("?", String::as_str),
            p
        );
    }
    Ok(())
}

fn run_label_issues(args: LabelIssuesArgs, quiet: bool) -> Result<()> {
    use bccp::label_issues::{dataset_report, mask_from_npy, write_jsonl};
    if let (Some(probs), Some(labels)) = (&args.pred_probs, &args.labels) {
        let mask = mask_from_npy(probs, labels, args.filter_by)?;
        bccp::npy::write_bool(&args.out, &mask)?;
        println!(
            "{} of {} samples flagged ({}); wrote {}",
            mask.iter().filter(|&&m| m).count(),
            mask.len(),
            args.filter_by.name(),
            args.out.display()
        );
        return Ok(());
    }
    let dataset = args
        .dataset
        .as_ref()
        .context("give --pred-probs P.npy --labels L.npy, or --dataset DIR")?;
    anyhow::ensure!(args.folds >= 2, "--folds {} must be 2 or more", args.folds);
    anyhow::ensure!(args.epochs >= 1, "--epochs must be 1 or more");
    let spec = backbone::zoo::find(&args.net.backbone)?;
    let weights = backbone::resolve_weights(&spec, args.net.weights.as_deref(), args.net.offline)?;
    let device = bccp::device::parse_device(&args.device)?;
    let list = backbone::embed::ImageList::from_path(dataset)?;
    anyhow::ensure!(
        list.files.len() > args.folds,
        "{} holds {} images; --folds {} needs more",
        dataset.display(),
        list.files.len(),
        args.folds
    );
    let pre = spec.preprocess_at(args.net.image_size)?;
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(backbone::cache::default_cache_dir);
    let weights_sha256 = backbone::cache::weights_hash(Some(&cache_dir), &weights)?;
    let progress = progress(quiet);
    let opts = backbone::embed::EmbedOptions {
        batch: 64,
        device: &device,
        skip_bad: false,
        cache_dir: Some(&cache_dir),
        progress: &progress,
    };
    let (set, _) = backbone::embed::embed_images(
        &list,
        &spec.name,
        &weights_sha256,
        &pre,
        spec.embedding_dim,
        || backbone::Backbone::load(&spec, &weights, &device),
        &opts,
    )?;
    let labels: Vec<u32> = set.targets.iter().map(|&t| t as u32).collect();
    let cfg = bccp::train::TrainConfig {
        epochs: args.epochs,
        seed: args.seed,
        ..Default::default()
    };
    let features = set.embeddings.to_device(&device)?;
    let probs = bccp::baselines::kfold_pred_probs(
        &features,
        &labels,
        set.classes.len(),
        args.folds,
        &cfg,
        &progress,
    )?;
    let (records, summary) = dataset_report(
        &set.paths,
        &set.classes,
        &labels,
        &probs.probs,
        args.filter_by,
    )?;
    write_jsonl(&args.out, &records)?;
    let summary_file = bccp::label_issues::summary_path(&args.out);
    bccp::label_issues::write_summary(&summary_file, &summary)?;
    println!("| class | samples | issues |\n|---|---:|---:|");
    for c in &summary {
        println!("| {} | {} | {} |", c.class, c.samples, c.issues);
    }
    let issues: usize = summary.iter().map(|c| c.issues).sum();
    println!(
        "\n{issues} of {} samples flagged ({}, {}-fold probabilities of a linear head on {} features); wrote {} and {}",
        records.len(),
        args.filter_by.name(),
        args.folds,
        spec.name,
        args.out.display(),
        summary_file.display()
    );
    Ok(())
}

fn run_experiment(args: ExperimentArgs) -> Result<()> {
    use bccp::experiment;
    let file = experiment::ExperimentFile::read(&args.config)?;
    let out = experiment::output_dir(&file, &args.config, args.out.as_deref());
    if args.report_only {
        let rows = experiment::report::read_csv(&out.join(experiment::RESULTS_CSV))?;
        anyhow::ensure!(!rows.is_empty(), "{} has no results yet", out.display());
        experiment::write_reports(&rows, &out)?;
        println!("wrote the reports in {}", out.display());
        return Ok(());
    }
    let summary = experiment::run(&file, &out, |line| println!("{line}"))?;
    println!(
        "\n{} runs: {} run now, {} already in {}; results.csv, results.md, accuracy.png and detection.png in {}",
        summary.total,
        summary.ran,
        summary.skipped,
        experiment::RESULTS_CSV,
        out.display()
    );
    Ok(())
}

fn run_runs(args: RunsArgs) -> Result<()> {
    println!(
        "{:<24} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "run", "version", "test_acc", "monday", "tuesday", "noise_f1"
    );
    for run in bccp::registry::list(&args.runs_dir) {
        let m = bccp::registry::read_json(&run, "metrics.json").unwrap_or_default();
        let f = |k: &str| {
            m.get(k)
                .and_then(|v| v.as_f64())
                .map_or("-".to_owned(), |v| format!("{v:.4}"))
        };
        println!(
            "{:<24} {:>7} {:>9} {:>9} {:>9} {:>9}",
            run.name,
            run.version,
            f("test_accuracy"),
            f("test_accuracy_monday"),
            f("test_accuracy_tuesday"),
            f("noise_f1")
        );
    }
    Ok(())
}

fn run_models() {
    println!("{:<22} {:>5} {:>6}  weights", "name", "dim", "input");
    for b in backbone::zoo::zoo() {
        let source = match &b.weights {
            backbone::zoo::WeightSource::Hub(h) => {
                format!("hub {}:{} ({})", h.repo, h.file, h.revision)
            }
            backbone::zoo::WeightSource::Local(p) => {
                backbone::assets_dir().join(p).display().to_string()
            }
        };
        println!(
            "{:<22} {:>5} {:>6}  {source}",
            b.name, b.embedding_dim, b.input_size
        );
    }
}

fn main() -> ExitCode {
    bccp::runtime::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(ImportCommand::Idx(args)) => run_import_idx(args, cli.quiet),
        Command::Prepare(args) => run_prepare(args, cli.quiet),
        Command::Info(args) => run_info(args),
        Command::Embed(args) => run_embed(args, cli.quiet),
        Command::Classify(args) => run_classify(args),
        Command::Closest(args) => run_closest(args),
        Command::Sample(args) => run_sample(args),
        Command::Train(args) => run_train(args, cli.quiet),
        Command::Predict(args) => run_predict(args),
        Command::Runs(args) => run_runs(args),
        Command::LabelIssues(args) => run_label_issues(args, cli.quiet),
        Command::Experiment(args) => run_experiment(args),
        Command::Models => {
            run_models();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
