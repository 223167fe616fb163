//! ResNet-18/34/50 (torchvision / timm tensor names) in candle's differentiable ops, with the
//! batch-norms folded into the convolutions like the backbones written here, so that
//! `--finetune full` can train it. The stem's 3×3 stride-2 max-pool is composed from strided
//! slices and element-wise maxima ([`max_pool_3x3_s2`]): candle's own max-pool has no backward
//! pass when the kernel differs from the stride.

use candle_core::shape::Dim;
use candle_core::{Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, ConvBn, ConvBnNames, ConvKind, ConvSpec, Padding, Training, Tunable,
};

const BN_EPS: f64 = 1e-5;
/// Stem width, then the width of each stage.
const STEM: usize = 64;
const WIDTHS: [usize; 4] = [64, 128, 256, 512];

/// One residual block: its convolutions in order (ReLU after all but the last) and the
/// projection of the shortcut when the shape changes.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, conv) in self.convs.iter().enumerate() {
            y = conv.forward(&y)?;
            if i < last {
                y = y.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// A ResNet's feature extractor (no classifier): stem, four stages, global average pool.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    blocks: Vec<Block>,
}

/// A convolution + batch-norm of the checkpoint, without activation (applied by the caller).
fn conv_bn(
    conv: VarBuilder,
    bn: VarBuilder,
    (cin, cout, kernel, stride): (usize, usize, usize, usize),
) -> Result<ConvBn> {
    let spec = ConvSpec {
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride,
        padding: Padding::Symmetric(kernel / 2),
        kind: if kernel == 1 && stride == 1 {
            ConvKind::Pointwise
        } else {
            ConvKind::Dense
        },
        relu6: false,
        bn_eps: BN_EPS,
    };
    ConvBn::load(spec, ConvBnNames { conv, bn })
}

impl ResNet {
    /// Loads ResNet-`depth` (18, 34 or 50) from tensors named as torchvision's (`conv1`,
    /// `bn1`, `layerL.I.convJ`, `layerL.I.bnJ`, `layerL.I.downsample.{0,1}`); `fc` is ignored.
    pub fn load(depth: usize, vb: VarBuilder) -> Result<Self> {
        let (counts, bottleneck) = match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            _ => candle_core::bail!("ResNet-{depth} is not in the zoo (18, 34, 50)"),
        };
        let stem = conv_bn(vb.pp("conv1"), vb.pp("bn1"), (3, STEM, 7, 2))?;
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (stage, (&count, &width)) in counts.iter().zip(&WIDTHS).enumerate() {
            let lvb = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let bvb = lvb.pp(i);
                let cv = |j: usize, shape| {
                    conv_bn(bvb.pp(format!("conv{j}")), bvb.pp(format!("bn{j}")), shape)
                };
                let (convs, cout) = if bottleneck {
                    let out = width * 4;
                    let convs = vec![
                        cv(1, (cin, width, 1, 1))?,
                        cv(2, (width, width, 3, stride))?,
                        cv(3, (width, out, 1, 1))?,
                    ];
                    (convs, out)
                } else {
                    let convs = vec![
                        cv(1, (cin, width, 3, stride))?,
                        cv(2, (width, width, 3, 1))?,
                    ];
                    (convs, width)
                };
                let downsample = if stride != 1 || cin != cout {
                    let dvb = bvb.pp("downsample");
                    Some(conv_bn(dvb.pp(0), dvb.pp(1), (cin, cout, 1, stride))?)
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                cin = cout;
            }
        }
        Ok(Self { stem, blocks })
    }

    /// The pooled features `[N, C]` of images `[N, 3, H, W]`.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = max_pool_3x3_s2(&self.stem.forward(x)?.relu()?)?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        global_avg_pool(&y)
    }

    /// The stem's convolution, then each residual block's convolutions (ReLU after all but
    /// the last) with its shortcut projection: what the channels-last engine lays out.
    pub(crate) fn parts(&self) -> (&ConvBn, impl Iterator<Item = (&[ConvBn], Option<&ConvBn>)>) {
        let blocks = self
            .blocks
            .iter()
            .map(|b| (b.convs.as_slice(), b.downsample.as_ref()));
        (&self.stem, blocks)
    }

    fn layers(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(
            self.blocks
                .iter()
                .flat_map(|b| b.convs.iter().chain(b.downsample.as_ref())),
        )
    }
}

impl ResNet {
    /// Convolutions per block, in the order of [`Tunable::make_trainable`]: the stem, then
    /// each residual block (its downsampling one included).
    pub fn block_conv_counts(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(
                self.blocks
                    .iter()
                    .map(|b| b.convs.len() + usize::from(b.downsample.is_some())),
            )
            .collect()
    }
}

impl Tunable for ResNet {
    fn make_trainable(&mut self, vars: &mut Vec<Var>) -> Result<()> {
        self.stem.make_trainable(vars)?;
        for block in &mut self.blocks {
            for conv in block.convs.iter_mut().chain(block.downsample.as_mut()) {
                conv.make_trainable(vars)?;
            }
        }
        Ok(())
    }

    fn make_trainable_bn(&mut self, vars: &mut Vec<Var>, training: &Training) -> Result<()> {
        self.stem.make_trainable_bn(vars, training)?;
        for block in &mut self.blocks {
            for conv in block.convs.iter_mut().chain(block.downsample.as_mut()) {
                conv.make_trainable_bn(vars, training)?;
            }
        }
        Ok(())
    }

    fn export(&self, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        self.layers().try_for_each(|l| l.export(out))
    }

    fn conv_bns(&self) -> Vec<&ConvBn> {
        self.layers().collect()
    }
}

/// Max-pool with a 3×3 window, stride 2 and one pixel of padding that repeats the edge (the
/// same result as -∞ padding), as ResNet's stem pools: `[N, C, H, W]` → `[N, C, ⌊(H−1)/2⌋+1,
/// ⌊(W−1)/2⌋+1]`. Built from slices and `maximum`, so autograd passes gradients through it
/// (a tie shares the gradient between the equal inputs).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let rows = max3_stride2(x, D::Minus2)?;
    max3_stride2(&rows, D::Minus1)
}

/// Along `dim` of length L: out[i] = max(x[2i−1], x[2i], x[2i+1]) for i < ⌊(L−1)/2⌋+1, with
/// x[−1] = x[0] and x[L] = x[L−1].
fn max3_stride2(x: &Tensor, dim: D) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let out = (len - 1) / 2 + 1;
    // Padded p[j] = x[j−1]; window i covers p[2i], p[2i+1], p[2i+2]. The slice for offset 2
    // ends at p[2·out+1], one past the padding when L is odd: repeat the edge once more (that
    // element only ever lands in the discarded odd slot).
    let extra = (2 * out + 2).saturating_sub(len + 2);
    let padded = x.pad_with_same(dim, 1, 1 + extra)?;
    let axis = dim.to_index(padded.shape(), "max_pool_3x3_s2")?;
    let every_other = |start: usize| -> Result<Tensor> {
        let slice = padded.narrow(axis, start, 2 * out)?;
        let mut dims = slice.dims().to_vec();
        dims[axis] = out;
        dims.insert(axis + 1, 2);
        slice
            .reshape(dims)?
            .narrow(axis + 1, 0, 1)?
            .squeeze(axis + 1)
    };
    every_other(0)?
        .maximum(&every_other(1)?)?
        .maximum(&every_other(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The reference: candle's max-pool after edge padding, as candle-transformers' ResNet.
    fn reference(x: &Tensor) -> Result<Tensor> {
        x.pad_with_same(D::Minus1, 1, 1)?
            .pad_with_same(D::Minus2, 1, 1)?
            .max_pool2d_with_stride(3, 2)
    }

    #[test]
    fn max_pool_matches_candle_on_even_and_odd_sizes() -> Result<()> {
        for (h, w) in [(8, 8), (7, 9), (1, 2), (5, 4)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu)?;
            let ours = max_pool_3x3_s2(&x)?;
            let want = reference(&x)?;
            assert_eq!(ours.dims(), want.dims(), "shape at {h}×{w}");
            let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "values at {h}×{w}");
        }
        Ok(())
    }

    #[test]
    fn max_pool_gradient_goes_to_each_windows_maximum() -> Result<()> {
        // A 4×4 map of distinct values: output 2×2, windows rows/cols {-1,0,1} and {1,2,3}.
        let data: Vec<f32> = vec![
            1., 9., 2., 3., //
            4., 5., 6., 16., //
            7., 8., 10., 11., //
            12., 13., 14., 15.,
        ];
        let var = Var::from_tensor(&Tensor::from_vec(data, (1, 1, 4, 4), &Device::Cpu)?)?;
        let y = max_pool_3x3_s2(var.as_tensor())?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![9., 16., 13., 16.],
            "window maxima"
        );
        // Weights 1, 2, 3, 4 on the four outputs: 16 is the maximum of two windows (2 + 4).
        let w = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu)?;
        let grads = (y * w)?.sum_all()?.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("a gradient for the input")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut want = vec![0f32; 16];
        want[1] = 1.; // 9
        want[7] = 6.; // 16
        want[13] = 3.; // 13
        assert_eq!(g, want);
        Ok(())
    }

    #[test]
    fn resnet18_matches_candle_transformers_and_trains() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        // candle-transformers' layers create the tensors (random conv weights, unit
        // batch-norm); randomise the batch-norm statistics so that folding matters.
        let reference = candle_transformers::models::resnet::resnet18_no_final_layer(vb.clone())?;
        for (name, var) in vm.data().lock().expect("varmap lock").iter() {
            if name.contains("bn") || name.contains("downsample.1") {
                let t = var.as_tensor();
                let r = Tensor::rand(0.5f32, 1.5, t.shape(), &dev)?;
                let v = if name.ends_with("running_mean") || name.ends_with("bias") {
                    (r - 1.0)?
                } else {
                    r
                };
                var.set(&v)?;
            }
        }
        let mut ours = ResNet::load(18, vb)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 33, 30), &dev)?;
        let want = reference.forward(&x)?;
        let got = ours.embed(&x)?;
        assert_eq!(got.dims(), &[2, 512]);
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "diff {diff} at scale {scale}"
        );

        // Every folded parameter gets a gradient, the stem's included (through the max-pool).
        let mut vars = Vec::new();
        ours.make_trainable(&mut vars)?;
        assert_eq!(vars.len(), 2 * (1 + 8 * 2 + 3));
        let grads = ours.embed(&x)?.sqr()?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let g = grads.get(v.as_tensor()).expect("a gradient per parameter");
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "parameter {i} got a zero gradient");
        }
        Ok(())
    }
}
