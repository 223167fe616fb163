//! The `bccp` command line: parses, dispatches to one file per command under `cli/`, prints
//! the error.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Import(cli::import::ImportCommand),
    /// Split an image folder into clean Monday and corrupted Tuesday data with manifests.
    Prepare(cli::prepare::PrepareArgs),
    /// Summarise an image folder or a prepared Monday/Tuesday dataset.
    Info(cli::info::InfoArgs),
    /// Embed images with a pretrained backbone into a safetensors file.
    Embed(cli::embed::EmbedArgs),
    /// Print the top ImageNet classes of images (a check that a pretrained model is wired right).
    Classify(cli::classify::ClassifyArgs),
    /// List the backbones of the model zoo.
    Models,
    /// The k closest candidates of every query embedding (L1, L2 or cosine).
    Closest(cli::closest::ClosestArgs),
    /// Merge the partial results of `closest --candidates-shard` (any order) into one.
    MergeTopk(cli::merge_topk::MergeTopkArgs),
    /// Cut the highest scores of per-shard score arrays, one percentile over all shards.
    CutScores(cli::cut_scores::CutScoresArgs),
    /// Choose images to replay from the reuse buffer (none, random, closest pairs).
    Sample(cli::sample::SampleArgs),
    /// The full run: embed, replay, Bayesian cut-off, train, evaluate, register.
    Train(cli::train::TrainArgs),
    /// Classify images with a registered run.
    Predict(cli::predict::PredictArgs),
    /// List registered runs with their key metrics, or move an alias.
    Runs(cli::runs::RunsArgs),
    /// A data-quality report: label issues, duplicates and leaks, outliers, corrupted images,
    /// class balance (report.jsonl, summary.json, report.html).
    Audit(cli::audit::AuditArgs),
    /// Find likely wrong labels with confident learning (cleanlab's find_label_issues).
    LabelIssues(cli::label_issues::LabelIssuesArgs),
    /// Feed the data store from a prepared dataset: bulk, then a stream at a rate (the
    /// reference's data generator).
    Generate(cli::generate::GenerateArgs),
    /// Feed the data store from an image folder or a JSON Lines file.
    Ingest(cli::ingest::IngestArgs),
    /// One cycle of the self-cleansing loop: new samples, replay, cleansing, challengers, the
    /// gate, and the champion alias moved when one wins.
    Retrain(cli::retrain::RetrainArgs),
    /// The loop in one process: store, optional generator, scheduled retrain cycles, and the
    /// prediction server.
    Up(Box<cli::up::UpArgs>),
    /// Serve a registered model over HTTP: predictions, feedback, metrics, hot reload.
    Serve(cli::serve::ServeArgs),
    /// Run a grid of train runs from a TOML file; write results.csv, results.md and charts.
    Experiment(cli::experiment::ExperimentArgs),
    /// Kafka: sample records from a topic into the store, store rows out to a topic.
    #[cfg(feature = "kafka")]
    #[command(subcommand)]
    Stream(cli::stream::StreamCommand),
}

fn main() -> ExitCode {
    bccp::runtime::init();
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Import(c) => cli::import::run(c, quiet),
        Command::Prepare(args) => cli::prepare::run(args, quiet),
        Command::Info(args) => cli::info::run(args),
        Command::Embed(args) => cli::embed::run(args, quiet),
        Command::Classify(args) => cli::classify::run(args),
        Command::Models => cli::models::run(),
        Command::Closest(args) => cli::closest::run(args),
        Command::MergeTopk(args) => cli::merge_topk::run(args),
        Command::CutScores(args) => cli::cut_scores::run(args),
        Command::Sample(args) => cli::sample::run(args),
        Command::Train(args) => cli::train::run(args, quiet),
        Command::Predict(args) => cli::predict::run(args),
        Command::Runs(args) => cli::runs::run(args),
        Command::Audit(args) => cli::audit::run(args, quiet),
        Command::LabelIssues(args) => cli::label_issues::run(args, quiet),
        Command::Experiment(args) => cli::experiment::run(args),
        Command::Generate(args) => cli::generate::run(args, quiet),
        Command::Ingest(args) => cli::ingest::run(args),
        Command::Retrain(args) => cli::retrain::run(args, quiet),
        Command::Up(args) => cli::up::run(*args, quiet),
        Command::Serve(args) => cli::serve::run(args),
        #[cfg(feature = "kafka")]
        Command::Stream(c) => cli::stream::run(c),
    };
    // A command that failed because its outputs were removed under it by the SIGINT/SIGTERM
    // clean-up waits for that clean-up to end the process with the signal's exit code.
    bccp::runtime::await_exit();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
