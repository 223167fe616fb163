//! Adam on host parameter buffers, with the update of [`super::adam::Adam`] (candle-nn's AdamW
//! without weight decay: β₁ = 0.9, β₂ = 0.999, ε = 1e-8, bias-corrected moments), for the
//! channels-last trainer whose parameters are plain `Vec<f32>`s.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::adam::AdamState;

/// Adam state: the learning rate, the step count and both moments of every parameter.
#[derive(Debug, Clone)]
pub struct FlatAdam {
    lr: f64,
    step: i32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl FlatAdam {
    /// Adam at learning rate `lr` for parameters of the given lengths.
    pub fn new(lens: impl IntoIterator<Item = usize>, lr: f64) -> Self {
        let m: Vec<Vec<f32>> = lens.into_iter().map(|n| vec![0f32; n]).collect();
        Self {
            lr,
            step: 0,
            v: m.clone(),
            m,
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The full state (moments as 1-D tensors on the CPU), for a checkpoint.
    pub fn state(&self) -> candle_core::Result<AdamState> {
        let flat = |all: &[Vec<f32>]| -> candle_core::Result<Vec<Tensor>> {
            all.iter()
                .map(|x| Tensor::from_slice(x, x.len(), &Device::Cpu))
                .collect()
        };
        Ok(AdamState {
            step: self.step as usize,
            lr: self.lr,
            m: flat(&self.m)?,
            v: flat(&self.v)?,
        })
    }

    /// Continues from `state` (one saved by [`Self::state`] for parameters of the same lengths).
    pub fn restore(&mut self, state: &AdamState) -> candle_core::Result<()> {
        let take = |saved: &[Tensor], now: &[Vec<f32>]| -> candle_core::Result<Vec<Vec<f32>>> {
            if saved.len() != now.len() {
                candle_core::bail!(
                    "Adam state of {} moments for {} parameters",
                    saved.len(),
                    now.len()
                );
            }
            saved
                .iter()
                .zip(now)
                .map(|(t, n)| {
                    let values = t.flatten_all()?.to_vec1::<f32>()?;
                    if values.len() != n.len() {
                        candle_core::bail!(
                            "Adam moment of {} values for a parameter of {}",
                            values.len(),
                            n.len()
                        );
                    }
                    Ok(values)
                })
                .collect()
        };
        let m = take(&state.m, &self.m)?;
        let v = take(&state.v, &self.v)?;
        let Ok(step) = i32::try_from(state.step) else {
            candle_core::bail!("Adam step count {} is out of range", state.step);
        };
        *self = Self {
            lr: state.lr,
            step,
            m,
            v,
        };
        Ok(())
    }

    /// One update of every parameter from its gradient (same order and lengths as [`Self::new`]).
    pub fn step(&mut self, params: Vec<&mut Vec<f32>>, grads: &[Vec<f32>]) {
        assert!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "FlatAdam: {} parameters and {} gradients for {} moments",
            params.len(),
            grads.len(),
            self.m.len()
        );
        self.step += 1;
        let scale_m = (1.0 / (1.0 - BETA1.powi(self.step))) as f32;
        let scale_v = (1.0 / (1.0 - BETA2.powi(self.step))) as f32;
        let (b1, b2, lr, eps) = (BETA1 as f32, BETA2 as f32, self.lr as f32, EPS as f32);
        params
            .into_par_iter()
            .zip(grads)
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .for_each(|((p, g), (m, v))| {
                assert_eq!(p.len(), g.len(), "FlatAdam: gradient length");
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = *m * b1 + g * (1.0 - b1);
                    *v = *v * b2 + g * g * (1.0 - b2);
                    let update = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
                    *p -= update * lr;
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn follows_candle_adamw_without_decay() {
        // Three steps on two parameters with changing gradients, then a lower learning rate.
        let dev = Device::Cpu;
        let init = [vec![0.5f32, -1.0, 2.0], vec![0.25f32]];
        let vars: Vec<Var> = init
            .iter()
            .map(|v| Var::from_vec(v.clone(), v.len(), &dev).unwrap())
            .collect();
        let mut reference = super::super::adam::Adam::new(vars.clone(), 0.01).unwrap();
        let mut ours = FlatAdam::new(init.iter().map(Vec::len), 0.01);
        let mut params = init.to_vec();
        for step in 0..4 {
            if step == 3 {
                reference.set_learning_rate(0.001);
                ours.set_learning_rate(0.001);
            }
            // loss = Σ c · p² with c varying per step: gradient 2 c p.
            let c = 1.0 + step as f64;
            let loss = vars
                .iter()
                .map(|v| {
                    (v.as_tensor().sqr().unwrap() * c)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let grads: Vec<Vec<f32>> = params
                .iter()
                .map(|p| p.iter().map(|&x| 2.0 * c as f32 * x).collect())
                .collect();
            reference.backward_step(&loss).unwrap();
            ours.step(params.iter_mut().collect(), &grads);
            for (v, p) in vars.iter().zip(&params) {
                let want = v.as_tensor().to_vec1::<f32>().unwrap();
                for (a, b) in p.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-6, "step {step}: {p:?} vs {want:?}");
                }
            }
        }
        let moved = Tensor::new(params[0].as_slice(), &dev).unwrap();
        assert!(
            moved.to_vec1::<f32>().unwrap()[0] < 0.5,
            "the parameter descended"
        );
    }
}
