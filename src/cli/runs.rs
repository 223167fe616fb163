//! `bccp runs`: list registered runs; `bccp runs alias NAME VERSION ALIAS` moves an alias.

use anyhow::Result;
use clap::{Args, Subcommand};

use super::RegistryArgs;
use bccp::registry::metric;

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(subcommand)]
    action: Option<RunsAction>,
}

#[derive(Subcommand, Debug)]
enum RunsAction {
    /// Point ALIAS (e.g. champion) of NAME at VERSION, atomically.
    Alias {
        name: String,
        version: u32,
        alias: String,
    },
}

pub fn run(args: RunsArgs) -> Result<()> {
    let registry = args.registry.registry();
    if let Some(RunsAction::Alias {
        name,
        version,
        alias,
    }) = args.action
    {
        registry.set_alias(&name, &alias, version)?;
        println!("{name}@{alias} → version {version}");
        return Ok(());
    }
    println!(
        "{:<24} {:>7} {:>9} {:>9} {:>9} {:>9}  aliases",
        "run", "version", "test_acc", "monday", "tuesday", "noise_f1"
    );
    for run in registry.list() {
        let complete = registry.is_complete(&run);
        let record = registry.read(&run);
        let f = |name: &str| match &record {
            Ok(r) => r
                .metrics
                .scalar(name)
                .map_or("-".to_owned(), |v| format!("{v:.4}")),
            Err(_) if !complete => "incomplete".to_owned(),
            Err(_) => "corrupt".to_owned(),
        };
        let aliases: Vec<String> = registry
            .aliases(&run.name)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| *v == run.version)
            .map(|(a, _)| a)
            .collect();
        println!(
            "{:<24} {:>7} {:>9} {:>9} {:>9} {:>9}  {}",
            run.name,
            run.version,
            f(metric::TEST_ACCURACY),
            f(metric::TEST_ACCURACY_MONDAY),
            f(metric::TEST_ACCURACY_TUESDAY),
            f(metric::NOISE_F1),
            aliases.join(",")
        );
    }
    Ok(())
}
