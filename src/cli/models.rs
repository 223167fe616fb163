//! `bccp models`: the backbones of the model zoo.

use bccp::backbone::zoo::{zoo, WeightSource};

pub fn run() -> anyhow::Result<()> {
    println!("{:<22} {:>5} {:>6}  weights", "name", "dim", "input");
    for b in zoo() {
        let source = match &b.weights {
            WeightSource::Hub(h) => format!("hub {}:{} ({})", h.repo, h.file, h.revision),
            WeightSource::Local(p) => bccp::backbone::assets_dir().join(p).display().to_string(),
        };
        println!(
            "{:<22} {:>5} {:>6}  {source}",
            b.name, b.embedding_dim, b.input_size
        );
    }
    Ok(())
}
