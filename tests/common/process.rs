//! What the test servers (MLflow, moto, tansu) share: stopping a server's process group, and
//! running a Python snippet against one that prints JSON.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Stops the process group `child` leads (a server and its workers): SIGTERM, up to 10 s to
/// exit, then SIGKILL.
pub fn stop_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.wait();
}

/// Runs `python` (a `python -c …` command, arguments set) and parses the JSON its last line
/// of output holds; panics with its output when it fails or prints no JSON.
pub fn python_json(mut python: Command) -> serde_json::Value {
    let out = python.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}
