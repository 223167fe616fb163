//! `bccp train --resume`: a run killed (SIGKILL) after its first per-epoch checkpoint and then
//! resumed ends with the very tensors and figures of an uninterrupted run, for head-only
//! training and for `--finetune full`; a checkpoint of other settings, or a truncated one, is
//! refused naming the file.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{bccp, bccp_command, failure, prepared_small, quick_train_args, success};

/// A quick run of `days` ([`quick_train_args`]) as `name` over `epochs` epochs, with `extra`.
fn args(days: &Path, runs: &Path, name: &str, epochs: usize, extra: &[&str]) -> Vec<String> {
    let cache = runs.with_file_name("cache");
    let mut args = quick_train_args(days, runs, &cache, name);
    let at = args.iter().position(|a| a == "--epochs").expect("--epochs") + 1;
    args[at] = epochs.to_string();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(args: &[String]) -> Output {
    bccp(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Starts the run `args`, SIGKILLs it as soon as checkpoint `state` (`checkpoint.json`)
/// exists, and returns the epochs that checkpoint completed.
fn kill_after_first_checkpoint(args: &[String], state: &Path) -> usize {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = bccp_command(&refs)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("bccp starts");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !state.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before a checkpoint was seen: it is too short to interrupt");
        }
        assert!(Instant::now() < deadline, "no checkpoint after 600 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    meta["epochs_done"].as_u64().expect("epochs_done") as usize
}

/// `metrics.json` of a run without its timings.
fn metrics(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m.as_object_mut().unwrap().remove("seconds");
    m
}

/// Interrupts a run of `name`, checks that other settings cannot resume it, resumes it, and
/// compares the result with the uninterrupted run `straight`.
fn interrupt_and_resume(days: &Path, runs: &Path, name: &str, epochs: usize, extra: &[&str]) {
    let state = runs.join(name).join(".checkpoint/checkpoint.json");
    let done = kill_after_first_checkpoint(&args(days, runs, name, epochs, extra), &state);
    assert!(
        (1..epochs).contains(&done),
        "killed after {done} of {epochs} epochs"
    );
    // Other settings: refused, naming the checkpoint, what differs and how to start over.
    let other: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--lr", "0.02", "--resume"])
        .collect();
    let err = failure(&run(&args(days, runs, name, epochs, &other)));
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(err.contains("training settings"), "{err}");
    assert!(err.contains("run without --resume"), "{err}");
    assert!(state.exists(), "a refused resume keeps the checkpoint");

    let resume: Vec<&str> = extra.iter().copied().chain(["--resume"]).collect();
    let out = success(&run(&args(days, runs, name, epochs, &resume)));
    assert!(
        out.contains(&format!(
            "resuming from {}: {done} of {epochs} epochs done",
            state.display()
        )),
        "{out}"
    );
    assert!(
        !runs.join(name).join(".checkpoint").exists(),
        "checkpoint removed once registered"
    );
    let (a, b) = (runs.join("straight/1"), runs.join(name).join("1"));
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap(),
        "{name}: the tensors differ from the uninterrupted run's"
    );
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma["epochs"].as_array().unwrap().len(), epochs);
    assert_eq!(ma, mb, "{name}: metrics");
}

#[test]
fn a_killed_head_training_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");
    // Long enough to be killed mid-way: many one-sample steps.
    let (epochs, extra) = (1500, ["--batch-size", "1"]);
    success(&run(&args(&days, &runs, "straight", epochs, &extra)));
    interrupt_and_resume(&days, &runs, "resumed", epochs, &extra);
    // No checkpoint: from scratch, in one line.
    let out = success(&run(&args(&days, &runs, "fresh", 2, &["--resume"])));
    let line = format!(
        "--resume: no checkpoint in {}; training from scratch",
        runs.join("fresh/.checkpoint").display()
    );
    assert!(out.contains(&line), "{out}");
    // Another run of the name holds its checkpoint: --resume is refused, a plain run trains
    // without checkpoints.
    let registry = bccp::registry::Registry::open(&runs);
    let held = registry
        .lock_file("fresh", bccp::registry::CHECKPOINT_LOCK)
        .unwrap();
    let err = failure(&run(&args(&days, &runs, "fresh", 2, &["--resume"])));
    assert!(err.contains("another run of fresh is training"), "{err}");
    let out = success(&run(&args(&days, &runs, "fresh", 2, &[])));
    assert!(out.contains("this one trains without checkpoints"), "{out}");
    assert!(out.contains("registered fresh:2"), "{out}");
    drop(held);
}

#[test]
fn a_killed_full_finetune_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let days = prepared_small(tmp.path());
    let runs = tmp.path().join("runs");
    let extra = [
        "--finetune",
        "full",
        "--batch-size",
        "4",
        "--freeze-blocks",
        "2",
    ];
    success(&run(&args(&days, &runs, "straight", 5, &extra)));
    interrupt_and_resume(&days, &runs, "resumed", 5, &extra);
    // Without --resume a checkpoint left behind is discarded, and the run starts over.
    let state = runs.join("again/.checkpoint/checkpoint.json");
    let done = kill_after_first_checkpoint(&args(&days, &runs, "again", 5, &extra), &state);
    // A truncated tensor file: --resume fails naming it.
    let tensors = runs.join(format!("again/.checkpoint/epoch-{done}.safetensors"));
    let bytes = std::fs::read(&tensors).unwrap();
    std::fs::write(&tensors, &bytes[..bytes.len() / 3]).unwrap();
    let resume: Vec<&str> = extra.iter().copied().chain(["--resume"]).collect();
    let err = failure(&run(&args(&days, &runs, "again", 5, &resume)));
    assert!(err.contains(&tensors.display().to_string()), "{err}");
    assert!(err.contains("truncated or changed"), "{err}");
    let out = success(&run(&args(&days, &runs, "again", 5, &extra)));
    assert!(!out.contains("resuming"), "{out}");
    assert_eq!(
        metrics(&runs.join("again/1")),
        metrics(&runs.join("straight/1"))
    );
}
