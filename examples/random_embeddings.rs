//! Writes a random embedding file (uniform values in [-1, 1), targets `row % classes`) for
//! benchmarks, streamed to disk so that a 2 GB file needs little memory:
//!
//! `cargo run --release --example random_embeddings -- ROWS DIM SEED OUT.safetensors [CLASSES]`

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result};
use bccp::rng::Rng;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: random_embeddings ROWS DIM SEED OUT.safetensors [CLASSES]";
    anyhow::ensure!(args.len() == 4 || args.len() == 5, "{usage}");
    let number = |i: usize| -> Result<u64> {
        args[i]
            .parse()
            .with_context(|| format!("{:?} is not a whole number; {usage}", args[i]))
    };
    let (rows, dim, seed) = (number(0)? as usize, number(1)? as usize, number(2)?);
    let classes = if args.len() == 5 {
        number(4)?.max(1)
    } else {
        10
    };
    let out = std::path::PathBuf::from(&args[3]);
    let matrix = rows * dim * 4;
    let mut header = serde_json::Map::new();
    let meta: BTreeMap<&str, String> = [
        ("model", "random".to_owned()),
        ("weights_sha256", String::new()),
        (
            "list_sha256",
            format!("random rows={rows} dim={dim} seed={seed}"),
        ),
    ]
    .into_iter()
    .collect();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    header.insert(
        "embeddings".into(),
        serde_json::json!({"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, matrix]}),
    );
    header.insert(
        "targets".into(),
        serde_json::json!({"dtype": "I64", "shape": [rows], "data_offsets": [matrix, matrix + rows * 8]}),
    );
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let tmp = out.with_extension("partial");
    let mut w = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;
    let mut rng = Rng::new(seed);
    for _ in 0..rows * dim {
        w.write_all(&((rng.unit_f64() * 2.0 - 1.0) as f32).to_le_bytes())?;
    }
    for r in 0..rows as u64 {
        w.write_all(&((r % classes) as i64).to_le_bytes())?;
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "wrote {rows} x {dim} random embeddings to {}",
        out.display()
    );
    Ok(())
}
