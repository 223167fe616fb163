//! The bookkeeping the training loops (head only, `--finetune full` on candle's autograd and on
//! the channels-last engine) share across epochs — the sample order, the shuffle and dropout
//! generators, the figures so far — with its checkpointing ([`super::checkpoint`]): where a loop
//! starts (from scratch, or after a saved state's last epoch) and what it saves after each epoch.

use candle_core::{Tensor, Var};

use super::adam::{Adam, AdamState};
use super::checkpoint::{as_candle, Checkpoint, Checkpointing, TrainState};
use super::EpochStats;
use crate::rng::Rng;

/// What a start state holds beyond the head and the loop's bookkeeping: the trained backbone
/// tensors and the optimisers after the head's, for the loop to restore.
pub struct Rest {
    pub backbone: Vec<Tensor>,
    pub optimisers: Vec<AdamState>,
}

/// The bookkeeping every training loop shares across epochs — the sample order (each epoch
/// shuffles the previous one), the shuffle and dropout generators, the figures so far, the
/// first epoch to run — and its checkpointing.
pub struct EpochLoop<'a> {
    pub order: Vec<u32>,
    pub shuffle_rng: Rng,
    pub dropout_rng: Rng,
    pub history: Vec<EpochStats>,
    /// The first epoch to run (1-based; after a start state's last completed one).
    pub first: usize,
    checkpoint: Option<&'a Checkpoint>,
    stop_after: Option<usize>,
}

impl<'a> EpochLoop<'a> {
    /// A loop over `n` samples with the generators of `seed`, from scratch, or from
    /// `checkpointing`'s start state: its head is restored into `head_vars` and `head_opt`, and
    /// the rest of it is returned for the caller to restore.
    pub fn start(
        n: usize,
        seed: u64,
        head_vars: &[Var],
        head_opt: &mut Adam,
        checkpointing: Option<Checkpointing<'a>>,
    ) -> candle_core::Result<(Self, Option<Rest>)> {
        let mut lp = Self {
            order: (0..n as u32).collect(),
            shuffle_rng: Rng::derive(seed, 0x5EED),
            dropout_rng: Rng::derive(seed, 0xD0),
            history: Vec::new(),
            first: 1,
            checkpoint: None,
            stop_after: None,
        };
        let Some(c) = checkpointing else {
            return Ok((lp, None));
        };
        (lp.checkpoint, lp.stop_after) = (Some(c.checkpoint), c.stop_after);
        let Some(s) = c.start else {
            return Ok((lp, None));
        };
        restore_vars(head_vars, &s.head, "head")?;
        let mut optimisers = s.optimisers.into_iter();
        match optimisers.next() {
            Some(h) => head_opt.restore(&h)?,
            None => candle_core::bail!("checkpoint: no optimiser state for the head"),
        }
        lp.order = restore_order(s.order, n)?;
        (lp.shuffle_rng, lp.dropout_rng) = (s.shuffle_rng, s.dropout_rng);
        (lp.history, lp.first) = (s.history, s.epochs_done + 1);
        let rest = Rest {
            backbone: s.backbone,
            optimisers: optimisers.collect(),
        };
        Ok((lp, Some(rest)))
    }

    /// Ends epoch `epoch`: saves the checkpoint when there is one (the head's `head_vars` and
    /// `head_opt`, and what `rest` returns); whether the loop stops here.
    pub fn end_epoch(
        &self,
        epoch: usize,
        head_vars: &[Var],
        head_opt: &Adam,
        rest: impl FnOnce() -> candle_core::Result<Rest>,
    ) -> candle_core::Result<bool> {
        if let Some(c) = self.checkpoint {
            let Rest {
                backbone,
                optimisers,
            } = rest()?;
            let state = TrainState {
                epochs_done: epoch,
                history: self.history.clone(),
                order: self.order.clone(),
                shuffle_rng: self.shuffle_rng.clone(),
                dropout_rng: self.dropout_rng.clone(),
                head: copies(head_vars)?,
                backbone,
                optimisers: std::iter::once(head_opt.state())
                    .chain(optimisers)
                    .collect(),
            };
            c.save(&state).map_err(as_candle)?;
        }
        Ok(self.stop_after == Some(epoch))
    }
}

/// Copies of the values of `vars` (a checkpoint's, taken while training goes on).
pub fn copies(vars: &[Var]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter().map(|v| v.as_tensor().copy()).collect()
}

/// Sets `vars` to `saved` (same count and shapes), e.g. a head from a [`TrainState`].
pub fn restore_vars(vars: &[Var], saved: &[Tensor], what: &str) -> candle_core::Result<()> {
    if vars.len() != saved.len() {
        candle_core::bail!(
            "checkpoint: {} saved {what} tensors for {} variables",
            saved.len(),
            vars.len()
        );
    }
    for (var, t) in vars.iter().zip(saved) {
        if var.shape() != t.shape() {
            candle_core::bail!(
                "checkpoint: saved {what} tensor {:?} for a variable {:?}",
                t.shape(),
                var.shape()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A saved sample order, checked to be a permutation of `0..n`.
pub fn restore_order(order: Vec<u32>, n: usize) -> candle_core::Result<Vec<u32>> {
    let mut seen = vec![false; n];
    for &i in &order {
        match seen.get_mut(i as usize) {
            Some(s) if !*s => *s = true,
            _ => candle_core::bail!(
                "checkpoint: the saved sample order is not a permutation of {n} samples"
            ),
        }
    }
    if order.len() != n {
        candle_core::bail!(
            "checkpoint: a saved order of {} samples for {n} training samples",
            order.len()
        );
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_must_be_permutations() {
        assert_eq!(restore_order(vec![1, 0, 2], 3).unwrap(), [1, 0, 2]);
        for bad in [vec![1, 1, 2], vec![0, 1], vec![0, 1, 3]] {
            let err = restore_order(bad.clone(), 3).unwrap_err().to_string();
            assert!(err.contains("3"), "{bad:?}: {err}");
        }
    }
}
