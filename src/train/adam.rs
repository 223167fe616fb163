//! Adam on candle tensors whose state we own, so that a checkpoint can save and restore it:
//! the update of candle-nn's `AdamW` without weight decay (β₁ = 0.9, β₂ = 0.999, ε = 1e-8,
//! bias-corrected moments), written with the same tensor ops in the same order, hence
//! bit-identical to it (tested below).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The full state of an Adam optimiser: the steps taken, the current learning rate and both
/// moments of every parameter (in the parameters' order). [`super::flat_adam::FlatAdam`] has
/// the same state, as flat tensors.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub step: usize,
    pub lr: f64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

/// Adam over candle variables (AdamW without weight decay).
#[derive(Debug)]
pub struct Adam {
    vars: Vec<Var>,
    state: AdamState,
}

impl Adam {
    /// Adam at learning rate `lr` over `vars`, with zero moments.
    pub fn new(vars: Vec<Var>, lr: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            state: AdamState { step: 0, lr, m, v },
        })
    }

    /// The learning rate of the next steps.
    pub fn learning_rate(&self) -> f64 {
        self.state.lr
    }

    /// Sets the learning rate of the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.state.lr = lr;
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let s = &mut self.state;
        s.step += 1;
        let lr = s.lr;
        let scale_m = 1f64 / (1f64 - BETA1.powi(s.step as i32));
        let scale_v = 1f64 / (1f64 - BETA2.powi(s.step as i32));
        for ((theta, m), v) in self.vars.iter().zip(&mut s.m).zip(&mut s.v) {
            let Some(g) = grads.get(theta) else {
                continue;
            };
            let next_m = ((&*m * BETA1)? + (g * (1.0 - BETA1))?)?;
            let next_v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            // AdamW's decay factor 1 − lr·λ at λ = 0: kept, as it maps −0 to +0 as AdamW does.
            let next_theta = (theta.as_tensor() * 1f64)?;
            let adjusted = (m_hat / (v_hat.sqrt()? + EPS)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            *m = next_m;
            *v = next_v;
            theta.set(&next_theta)?;
        }
        Ok(())
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The optimiser's state (tensors shared, not copied: later steps replace them).
    pub fn state(&self) -> AdamState {
        self.state.clone()
    }

    /// Continues from `state` (one saved by [`Self::state`] for variables of the same shapes).
    pub fn restore(&mut self, state: &AdamState) -> Result<()> {
        let n = self.vars.len();
        if state.m.len() != n || state.v.len() != n {
            candle_core::bail!(
                "Adam state of {} / {} moments for {n} variables",
                state.m.len(),
                state.v.len()
            );
        }
        let device = self.vars.first().map(|v| v.device().clone());
        let mut m = Vec::with_capacity(n);
        let mut v = Vec::with_capacity(n);
        for ((var, sm), sv) in self.vars.iter().zip(&state.m).zip(&state.v) {
            for saved in [sm, sv] {
                if saved.shape() != var.shape() || saved.dtype() != var.dtype() {
                    candle_core::bail!(
                        "Adam moment {:?} {:?} for a variable {:?} {:?}",
                        saved.shape(),
                        saved.dtype(),
                        var.shape(),
                        var.dtype()
                    );
                }
            }
            let device = device.as_ref().unwrap_or(var.device());
            m.push(sm.to_device(device)?);
            v.push(sv.to_device(device)?);
        }
        self.state = AdamState {
            step: state.step,
            lr: state.lr,
            m,
            v,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};
    use candle_nn::Optimizer;

    /// Bits of every variable.
    fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
        vars.iter()
            .map(|v| {
                let t = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                t.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    }

    /// Copies of `vars` (fresh variables holding the same values).
    fn copies(vars: &[Var]) -> Vec<Var> {
        vars.iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
            .collect()
    }

    /// A softmax-regression loss on random data, different at every step.
    fn loss(vars: &[Var]) -> Tensor {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (16, 5), &dev).unwrap();
        let w = vars[0].as_tensor();
        let b = vars[1].as_tensor();
        let logits = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0], &dev).unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        candle_nn::loss::nll(&lsm, &y).unwrap()
    }

    #[test]
    fn bit_identical_to_candle_adamw_without_decay() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev).unwrap()).unwrap();
        // A −0 entry: AdamW's decay factor turns it into +0 when its gradient is 0.
        let b = Var::from_vec(vec![-0.0f32, 0.5, -1.0], 3, &dev).unwrap();
        let theirs_vars = vec![w, b];
        let ours_vars = copies(&theirs_vars);
        let params = candle_nn::ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut theirs = candle_nn::AdamW::new(theirs_vars.clone(), params).unwrap();
        let mut ours = Adam::new(ours_vars.clone(), 0.01).unwrap();
        for step in 0..8u64 {
            if step == 5 {
                theirs.set_learning_rate(0.003);
                ours.set_learning_rate(0.003);
            }
            // The same random data for both: the gradient of one loss, applied to each.
            let l = loss(&theirs_vars);
            let grads = l.backward().unwrap();
            let mut ours_grads = GradStore::default();
            for (t, o) in theirs_vars.iter().zip(&ours_vars) {
                let g = grads.get(t.as_tensor()).unwrap().clone();
                ours_grads.insert(o.as_tensor(), g);
            }
            theirs.step(&grads).unwrap();
            ours.step(&ours_grads).unwrap();
            assert_eq!(bits(&theirs_vars), bits(&ours_vars), "step {step}");
        }
        assert_eq!(ours.learning_rate(), 0.003);
        assert_eq!(ours.state().step, 8);
    }

    #[test]
    fn restored_state_continues_as_if_never_stopped() {
        let dev = Device::Cpu;
        let start = vec![
            Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev).unwrap()).unwrap(),
            Var::from_tensor(&Tensor::randn(0f32, 1., 3, &dev).unwrap()).unwrap(),
        ];
        let straight = copies(&start);
        let stopped = copies(&start);
        let mut a = Adam::new(straight.clone(), 0.02).unwrap();
        let mut b = Adam::new(stopped.clone(), 0.02).unwrap();
        let grads: Vec<GradStore> = (0..6).map(|_| loss(&start).backward().unwrap()).collect();
        let replay = |vars: &[Var], g: &GradStore| {
            let mut out = GradStore::default();
            for (s, v) in start.iter().zip(vars) {
                out.insert(v.as_tensor(), g.get(s.as_tensor()).unwrap().clone());
            }
            out
        };
        for g in &grads {
            a.step(&replay(&straight, g)).unwrap();
        }
        for g in &grads[..3] {
            b.step(&replay(&stopped, g)).unwrap();
        }
        // A new optimiser over fresh variables, restored from b's state and values.
        let resumed = copies(&stopped);
        let mut c = Adam::new(resumed.clone(), 0.5).unwrap();
        c.restore(&b.state()).unwrap();
        assert_eq!(c.learning_rate(), 0.02);
        for g in &grads[3..] {
            c.step(&replay(&resumed, g)).unwrap();
        }
        assert_eq!(bits(&straight), bits(&resumed));
        let mut wrong = b.state();
        wrong.m.pop();
        let err = c.restore(&wrong).unwrap_err().to_string();
        assert!(err.contains("1 / 2 moments for 2 variables"), "{err}");
    }
}
