//! `bccp up`: the self-cleansing loop in one process — the store, an optional generator (each
//! day of a prepared dataset arrives in bulk, then random records stream at `--rate`),
//! re-training cycles every `--every` that promote a champion by themselves, and the
//! prediction server following the champion (`--serve`, 127.0.0.1:8000 unless `--no-serve`);
//! a log line per event and a closing table of every cycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use super::retrain::{print_cycle, LoopArgs};
use super::serve::ServerArgs;
use super::DbArgs;
use bccp::data::Day;
use bccp::retrain::CycleReport;
use bccp::store::{self, GenerateOptions, StreamBound};

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    db: DbArgs,
    /// A dataset written by `bccp prepare`: its Monday, then its Tuesday records arrive in bulk,
    /// a cycle running after each day.
    #[arg(long)]
    generate: Option<PathBuf>,
    /// Probability that a Tuesday user label is right.
    #[arg(long, default_value_t = 0.7)]
    user_accuracy: f64,
    /// Share of the generated records held out as the trusted gate set.
    #[arg(long, default_value_t = 0.1)]
    gate_fraction: f64,
    /// After the bulk days, stream random records at this rate (N, N/s, N/min, N/h).
    #[arg(long)]
    rate: Option<String>,
    /// Time between scheduled cycles (e.g. 30s, 5m).
    #[arg(long, default_value = "60s")]
    every: String,
    /// Stop after this long (0 once the bulk days are done; `forever`: until Ctrl-C).
    #[arg(long, default_value = "0")]
    duration: String,
    /// Serve the champion here while the loop runs (predictions, feedback into the store,
    /// metrics, /dashboard); anything but loopback needs an API token.
    #[arg(long, default_value = "127.0.0.1:8000")]
    serve: SocketAddr,
    /// Do not start the prediction server.
    #[arg(long)]
    no_serve: bool,
    #[command(flatten)]
    settings: LoopArgs,
    #[command(flatten)]
    server: ServerArgs,
}

fn log(line: &str) {
    println!("[up {}] {line}", store::now_utc());
}

pub fn run(args: UpArgs, quiet: bool) -> Result<()> {
    let every = store::generate::parse_duration(&args.every)?
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--every {} must be a positive duration, e.g. 30s",
                args.every
            )
        })?;
    let duration = store::generate::parse_duration(&args.duration)?;
    let rate = args
        .rate
        .as_deref()
        .map(store::generate::parse_rate)
        .transpose()?;
    if rate.is_some() && args.generate.is_none() {
        bail!("--rate streams records of the --generate dataset; pass --generate PREPARED");
    }
    let url = args.db.url()?;
    let mut db = store::open(&url)?;
    let progress = super::progress(quiet);
    let _graceful = bccp::runtime::graceful_stop();
    let stopping = || bccp::runtime::stop_requested().is_some();
    let started = Instant::now();
    log(&format!("store {}", db.location()));
    let server = if args.no_serve {
        None
    } else {
        start_server(&args, &url)?
    };
    let cycle = |db: &mut dyn store::Store, trigger: &str| -> Result<()> {
        let (opts, env) = args.settings.options(trigger)?;
        log(&format!("retrain started ({trigger})"));
        match bccp::retrain::run_cycle(db, &env, &opts, &progress)? {
            CycleReport::Skipped { new, min_new } => log(&format!(
                "retrain skipped: {new} new training samples, fewer than --min-new {min_new}"
            )),
            CycleReport::Done(s) => {
                print_cycle(&s);
                match &s.promoted {
                    Some(v) => log(&format!("promoted {v} to champion")),
                    None => log("no challenger promoted; the champion stays"),
                }
            }
        }
        Ok(())
    };

    let mut stream = None;
    if let Some(dataset) = &args.generate {
        let base = GenerateOptions {
            dataset: dataset.clone(),
            days: Vec::new(),
            bulk: true,
            rate: None,
            bound: StreamBound::default(),
            user_accuracy: args.user_accuracy,
            gate_fraction: args.gate_fraction,
            seed: args.settings.seed,
            batch_size: bccp::store::GENERATE_BATCH_ROWS,
            view: None,
        };
        for day in [Day::Monday, Day::Tuesday] {
            if stopping() {
                break;
            }
            let summary = store::generate(
                db.as_mut(),
                &GenerateOptions {
                    days: vec![day],
                    ..base.clone()
                },
                &stopping,
                &mut |_| {},
            )?;
            let n: u64 = summary.bulk.iter().map(|(_, n)| n).sum();
            log(&format!(
                "ingested {n} {} samples ({} already stored)",
                day.as_str(),
                summary.already_stored
            ));
            cycle(db.as_mut(), &format!("{} arrived", day.as_str()))?;
        }
        if let Some(rate) = rate {
            // The stream has its own connection, in its own thread.
            let mut conn = store::open(&url)?;
            let opts = GenerateOptions {
                bulk: false,
                rate: Some(rate),
                days: vec![Day::Monday, Day::Tuesday],
                bound: StreamBound {
                    duration: duration.map(|d| d.saturating_sub(started.elapsed())),
                    limit: None,
                },
                ..base
            };
            log(&format!("streaming at {rate} rows/s"));
            stream = Some(std::thread::spawn(move || {
                let stop = || bccp::runtime::stop_requested().is_some();
                store::generate(conn.as_mut(), &opts, &stop, &mut |_| {})
            }));
        }
    }
    // Scheduled cycles until the duration is over (none when it is 0) or Ctrl-C.
    let over = |t: Duration| duration.is_some_and(|d| t >= d);
    let mut next = every;
    while !stopping() && !over(started.elapsed()) {
        let now = started.elapsed();
        if now >= next {
            cycle(db.as_mut(), "schedule")?;
            next = started.elapsed() + every;
            continue;
        }
        let wait = (next - now).min(Duration::from_millis(200));
        std::thread::sleep(wait);
    }
    if let Some(handle) = stream {
        match handle.join() {
            Ok(Ok(s)) => log(&format!("stream ended: {} rows", s.streamed)),
            Ok(Err(e)) => log(&format!("stream failed: {e}")),
            Err(_) => log("stream thread panicked"),
        }
    }
    if let Some(server) = server {
        server.shutdown()?;
        log("server stopped");
    }
    print_table(db.as_mut(), &args.settings.model)?;
    if let Some(signal) = bccp::runtime::stop_requested() {
        log(&format!(
            "stopped by signal {signal}; committed rows and decisions kept"
        ));
    }
    Ok(())
}

/// The prediction server following `MODEL@champion` (503 until the first promotion), its
/// image root the generated dataset unless `--image-root` says otherwise. An address in use
/// is a warning, not an error: the loop runs without the server.
fn start_server(args: &UpArgs, url: &store::DbUrl) -> Result<Option<bccp::serve::Server>> {
    let s = &args.settings;
    let spec = format!("{}@{}", s.model, bccp::retrain::CHAMPION);
    let mut config = args.server.config(
        &spec,
        s.registry.runs_dir.clone(),
        args.serve,
        Some(url.clone()),
        s.device.device()?,
        s.cache.dir(),
    )?;
    config.wait_for_model = true;
    if config.image_root.is_none() {
        config.image_root = args.generate.clone();
    }
    match bccp::serve::start(config) {
        Ok(server) => {
            let addr = server.addr();
            log(&format!(
                "serving {spec} on http://{addr} (dashboard: http://{addr}/dashboard)"
            ));
            Ok(Some(server))
        }
        Err(e @ bccp::serve::ServeError::Bind { .. }) => {
            log(&format!(
                "warning: not serving: {e}; choose another --serve ADDR (or --no-serve)"
            ));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Every cycle of `model` in the store: candidates, per challenger what was dropped,
/// relabelled and replayed, gate accuracy per day, and the decision.
fn print_table(db: &mut dyn store::Store, model: &str) -> Result<()> {
    let rows: Vec<store::Retrain> = db
        .retrains()?
        .into_iter()
        .filter(|r| {
            [&r.champion, &r.challenger].iter().any(|s| {
                s.as_deref()
                    .and_then(|s| s.split_once(':'))
                    .is_some_and(|(n, _)| n == model)
            })
        })
        .collect();
    println!("\n| cycle | trigger | candidates | challenger | method | dropped | relabelled | replayed | gate monday | gate tuesday | gate | decision |");
    println!("|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let reasons = &r.reasons;
        let candidates = reasons["candidates"].as_u64().unwrap_or(0);
        let empty = Vec::new();
        let challengers = reasons["challengers"].as_array().unwrap_or(&empty);
        if challengers.is_empty() {
            println!(
                "| {} | {} | {} | – | – | – | – | – | – | – | – | {} |",
                r.id, r.trigger, candidates, r.decision
            );
        }
        for c in challengers {
            let day = |d: &str| {
                c["gate"]["per_source"][d][0]
                    .as_f64()
                    .map_or("–".to_owned(), |a| format!("{a:.4}"))
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.4} | {} |",
                r.id,
                r.trigger,
                candidates,
                c["version"].as_str().unwrap_or("?"),
                c["method"].as_str().unwrap_or("?"),
                c["dropped"],
                // Cycles recorded before the count existed show "–".
                c["relabelled"]
                    .as_u64()
                    .map_or("–".to_owned(), |n| n.to_string()),
                c["replayed"],
                day("monday"),
                day("tuesday"),
                c["gate"]["accuracy"].as_f64().unwrap_or(f64::NAN),
                if c["promoted"].as_bool() == Some(true) {
                    "promoted".to_owned()
                } else {
                    c["reason"].as_str().unwrap_or("rejected").to_owned()
                }
            );
        }
    }
    if let Some(champion) = rows.iter().rev().find_map(|r| {
        (r.decision == "promoted")
            .then_some(r.champion.clone())
            .flatten()
    }) {
        println!("\nchampion: {champion} (alias {model}@champion)");
    }
    Ok(())
}
