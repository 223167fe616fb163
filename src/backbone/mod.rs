//! Pretrained backbones: the model zoo, weight loading (hub or local files), the networks and
//! batched embedding with a cache.

pub mod cache;
pub mod channels_last;
pub mod efficientnet_lite;
pub mod embedder;
pub mod error;
pub mod hub;
pub mod imagenet;
pub mod layers;
pub mod limits;
pub mod mobilenet_v2;
pub mod resnet;
pub mod vit;
pub mod zoo;

pub use embedder::{EmbedStats, Embedder, EmbedderConfig};
pub use error::{BackboneError, Result};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;

use crate::ops::bf16_gemm::Precision;
use channels_last::{ChannelsLastResNet, ChannelsLastTrunk};
use layers::{BnMode, Training, Trunk, Tunable};
use zoo::{Architecture, BackboneSpec, WeightSource};

/// Prefix of a fine-tuned backbone's tensors in a run's `model.safetensors`.
pub const TUNED_PREFIX: &str = "backbone";

/// The folder of locally installed assets: see [`crate::paths::assets_dir`].
pub fn assets_dir() -> PathBuf {
    crate::paths::assets_dir()
}

/// The weights file of `spec`: `override_path` when given, else the zoo's source (a local
/// asset, or the hub through its cache).
pub fn resolve_weights(
    spec: &BackboneSpec,
    override_path: Option<&Path>,
    offline: bool,
) -> Result<PathBuf> {
    if let Some(path) = override_path {
        if !path.is_file() {
            return Err(BackboneError::NoWeightsFile(path.to_path_buf()));
        }
        return Ok(path.to_path_buf());
    }
    match &spec.weights {
        WeightSource::Local(rel) => {
            let dir = assets_dir();
            let path = dir.join(rel);
            if !path.is_file() {
                return Err(BackboneError::WeightsNotFound {
                    name: spec.name.clone(),
                    file: rel.clone(),
                    dir,
                });
            }
            Ok(path)
        }
        WeightSource::Hub(hub) => Ok(hub::resolve(hub, offline)?),
    }
}

enum Network {
    MobileNetV2(mobilenet_v2::MobileNetV2),
    EfficientNetLite(efficientnet_lite::EfficientNetLite),
    ResNet(resnet::ResNet),
    Transformer(vit::VisionTransformer),
}

/// A network laid out for channels-last CPU inference.
enum CpuEngine {
    Trunk(Box<ChannelsLastTrunk>),
    ResNet(Box<ChannelsLastResNet>),
}

impl CpuEngine {
    fn embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            CpuEngine::Trunk(t) => t.embed(x),
            CpuEngine::ResNet(r) => r.embed(x),
        }
    }

    fn set_precision(&mut self, precision: Precision) -> candle_core::Result<()> {
        match self {
            CpuEngine::Trunk(t) => t.set_precision(precision),
            CpuEngine::ResNet(r) => r.set_precision(precision),
        }
    }
}

/// A loaded backbone: embeds preprocessed images `[N, 3, H, W]` into `[N, D]`.
pub struct Backbone {
    spec: BackboneSpec,
    network: Network,
    /// The network on the channels-last engine: CPU-loaded MobileNetV2, EfficientNet-Lite and
    /// ResNets with fixed weights.
    channels_last: Option<CpuEngine>,
    /// The arithmetic of the channels-last engine's products.
    precision: Precision,
    /// The switch of batch-norms in training mode (after [`Self::load_trainable_bn`]).
    bn_training: Option<Training>,
}

impl Backbone {
    /// Builds `spec`'s network from a `VarBuilder` (tensor names as in the checkpoint).
    pub fn from_var_builder(
        spec: &BackboneSpec,
        vb: VarBuilder<'static>,
    ) -> candle_core::Result<Self> {
        let on_cpu = vb.device().is_cpu();
        let network = match spec.architecture {
            Architecture::MobilenetV2 => Network::MobileNetV2(mobilenet_v2::MobileNetV2::load(vb)?),
            Architecture::EfficientnetLite0 => Network::EfficientNetLite(
                efficientnet_lite::EfficientNetLite::load(&efficientnet_lite::Config::lite0(), vb)?,
            ),
            Architecture::Resnet18 => Network::ResNet(resnet::ResNet::load(18, vb)?),
            Architecture::Resnet34 => Network::ResNet(resnet::ResNet::load(34, vb)?),
            Architecture::Resnet50 => Network::ResNet(resnet::ResNet::load(50, vb)?),
            Architecture::VitBasePatch16_224 => {
                Network::Transformer(vit::VisionTransformer::load(vit::Flavour::Vit, vb)?)
            }
            Architecture::ClipVitB32 => {
                Network::Transformer(vit::VisionTransformer::load(vit::Flavour::Clip, vb)?)
            }
            Architecture::Dinov2Small => {
                Network::Transformer(vit::VisionTransformer::load(vit::Flavour::Dinov2, vb)?)
            }
        };
        let mut model = Self {
            spec: spec.clone(),
            network,
            channels_last: None,
            precision: Precision::F32,
            bn_training: None,
        };
        if on_cpu {
            model.channels_last = model.cpu_engine()?;
        }
        Ok(model)
    }

    /// Loads `spec`'s network from a safetensors file onto `device` (f32).
    pub fn load(spec: &BackboneSpec, weights: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(weights, device).map_err(|e| {
            BackboneError::BadWeights {
                path: weights.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::from_var_builder(spec, vb).map_err(|e| BackboneError::Mismatch {
            what: format!("weights {}", weights.display()),
            name: spec.name.clone(),
            message: e.to_string(),
        })
    }

    /// The network's trainable form.
    fn tunable(&self) -> &dyn Tunable {
        match &self.network {
            Network::MobileNetV2(m) => m.trunk(),
            Network::EfficientNetLite(m) => m.trunk(),
            Network::ResNet(m) => m,
            Network::Transformer(m) => m,
        }
    }

    /// The convolutional trunk of MobileNetV2 / EfficientNet-Lite (`None` for the others).
    pub fn trunk(&self) -> Option<&Trunk> {
        match &self.network {
            Network::MobileNetV2(m) => Some(m.trunk()),
            Network::EfficientNetLite(m) => Some(m.trunk()),
            _ => None,
        }
    }

    /// Trainable variables of each of the network's blocks, in the order of
    /// [`Self::load_trainable`]'s variables (what `--freeze-blocks` counts): MobileNetV2 and
    /// EfficientNet-Lite the stem then the inverted-residual blocks, ResNet the stem then the
    /// residual blocks, the vision transformers the patch embedding then the encoder layers.
    pub fn block_var_counts(&self) -> Vec<usize> {
        // Per convolution: the folded weight and bias, or the weight, γ and β (`--bn train`).
        let per_conv = if self.bn_training.is_some() { 3 } else { 2 };
        match (&self.network, self.block_conv_counts()) {
            (Network::Transformer(m), _) => m.block_var_counts(),
            (_, Some(convs)) => convs.into_iter().map(|c| c * per_conv).collect(),
            (_, None) => Vec::new(),
        }
    }

    /// Convolutions per block of the CNNs (`None` for the vision transformers).
    fn block_conv_counts(&self) -> Option<Vec<usize>> {
        match &self.network {
            Network::MobileNetV2(m) => Some(m.trunk().block_conv_counts()),
            Network::EfficientNetLite(m) => Some(m.trunk().block_conv_counts()),
            Network::ResNet(m) => Some(m.block_conv_counts()),
            Network::Transformer(_) => None,
        }
    }

    /// The running mean and variance of every training batch-norm, in order (empty unless
    /// [`Self::trains_batch_norm`]): a checkpoint's copy.
    pub fn running_stats(&self) -> candle_core::Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for conv in self.tunable().conv_bns() {
            if let Some((mean, var)) = conv.running_stats() {
                out.push(mean.copy()?);
                out.push(var.copy()?);
            }
        }
        Ok(out)
    }

    /// Sets the running statistics from [`Self::running_stats`]' copy.
    pub fn set_running_stats(&self, saved: &[Tensor]) -> candle_core::Result<()> {
        let convs: Vec<_> = self
            .tunable()
            .conv_bns()
            .into_iter()
            .filter(|c| c.running_stats().is_some())
            .collect();
        if saved.len() != 2 * convs.len() {
            candle_core::bail!(
                "checkpoint: {} saved running statistics for {} batch-norms",
                saved.len(),
                convs.len()
            );
        }
        for (conv, pair) in convs.iter().zip(saved.chunks_exact(2)) {
            conv.set_running_stats(&pair[0], &pair[1])?;
        }
        Ok(())
    }

    /// Keeps the batch-norms of the first `blocks` blocks (those `--freeze-blocks` freezes) in
    /// evaluation mode: they keep their statistics.
    pub fn hold_batch_norms(&self, blocks: usize) {
        let (Some(_), Some(counts)) = (&self.bn_training, self.block_conv_counts()) else {
            return;
        };
        let convs: usize = counts.iter().take(blocks).sum();
        for conv in self.tunable().conv_bns().into_iter().take(convs) {
            conv.hold();
        }
    }

    /// Whether the batch-norms train ([`Self::load_trainable_bn`]).
    pub fn trains_batch_norm(&self) -> bool {
        self.bn_training.is_some()
    }

    /// Switches training-mode batch-norms between a training step's batch statistics (`on`)
    /// and the running statistics (evaluation); nothing for other networks.
    pub fn set_training(&self, on: bool) {
        if let Some(t) = &self.bn_training {
            t.set(on);
        }
    }

    /// Loads `spec`'s network with trainable parameters and returns them: the folded
    /// convolutions of the CNNs (batch-norm statistics frozen), every weight of the vision
    /// transformers but their class token and position embeddings.
    pub fn load_trainable(
        spec: &BackboneSpec,
        weights: &Path,
        device: &Device,
    ) -> Result<(Self, Vec<Var>)> {
        let mut model = Self::load(spec, weights, device)?;
        // Training changes the weights: embed through candle's ops, which follow them.
        model.channels_last = None;
        let mut vars = Vec::new();
        match &mut model.network {
            Network::MobileNetV2(m) => m.trunk_mut().make_trainable(&mut vars)?,
            Network::EfficientNetLite(m) => m.trunk_mut().make_trainable(&mut vars)?,
            Network::ResNet(m) => m.make_trainable(&mut vars)?,
            Network::Transformer(m) => m.make_trainable(&mut vars)?,
        }
        Ok((model, vars))
    }

    /// [`Self::load_trainable`] with `bn`: for [`BnMode::Train`], a CNN's batch-norms normalise
    /// by the batch while [`Self::set_training`] is on and their running statistics follow;
    /// the variables are each convolution's unfolded weight, γ and β. Errors for the vision
    /// transformers (no batch-norm).
    pub fn load_trainable_bn(
        spec: &BackboneSpec,
        weights: &Path,
        device: &Device,
        bn: BnMode,
    ) -> Result<(Self, Vec<Var>)> {
        if bn == BnMode::Frozen {
            return Self::load_trainable(spec, weights, device);
        }
        let mut model = Self::load(spec, weights, device)?;
        model.channels_last = None;
        let training = Training::default();
        let mut vars = Vec::new();
        let made = match &mut model.network {
            Network::MobileNetV2(m) => m.trunk_mut().make_trainable_bn(&mut vars, &training),
            Network::EfficientNetLite(m) => m.trunk_mut().make_trainable_bn(&mut vars, &training),
            Network::ResNet(m) => m.make_trainable_bn(&mut vars, &training),
            Network::Transformer(m) => m.make_trainable_bn(&mut vars, &training),
        };
        made.map_err(|e| BackboneError::Mismatch {
            what: "--bn train".into(),
            name: spec.name.clone(),
            message: e.to_string(),
        })?;
        model.bn_training = Some(training);
        Ok((model, vars))
    }

    /// The backbone's parameters in checkpoint layout, names prefixed with [`TUNED_PREFIX`].
    pub fn export_tuned(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        self.tunable().export(&mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, t)| (format!("{TUNED_PREFIX}.{k}"), t))
            .collect())
    }

    /// Rebuilds a fine-tuned backbone from a run's tensors (those under [`TUNED_PREFIX`]);
    /// `None` when the run has none (a linear probe).
    pub fn from_tuned(
        spec: &BackboneSpec,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Option<Self>> {
        let prefix = format!("{TUNED_PREFIX}.");
        let own: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), t.clone())))
            .collect();
        if own.is_empty() {
            return Ok(None);
        }
        let vb = VarBuilder::from_tensors(own, DType::F32, device);
        let model = Self::from_var_builder(spec, vb).map_err(|e| BackboneError::Mismatch {
            what: "the fine-tuned tensors".into(),
            name: spec.name.clone(),
            message: e.to_string(),
        })?;
        Ok(Some(model))
    }

    /// The zoo entry this backbone was built from.
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    /// Whether CPU embedding runs the channels-last engine (else candle's tensor ops).
    pub fn runs_channels_last(&self) -> bool {
        self.channels_last.is_some()
    }

    /// The ResNet of a ResNet backbone (`None` for the others).
    pub fn resnet(&self) -> Option<&resnet::ResNet> {
        match &self.network {
            Network::ResNet(m) => Some(m),
            _ => None,
        }
    }

    /// The channels-last engine for the network's current weights (the CNNs; `None` for the
    /// vision transformers).
    fn cpu_engine(&self) -> candle_core::Result<Option<CpuEngine>> {
        let mut engine = match self.resnet() {
            Some(net) => Some(CpuEngine::ResNet(Box::new(ChannelsLastResNet::new(net)?))),
            None => self
                .trunk()
                .map(ChannelsLastTrunk::new)
                .transpose()?
                .map(|t| CpuEngine::Trunk(Box::new(t))),
        };
        if let Some(e) = &mut engine {
            e.set_precision(self.precision)?;
        }
        Ok(engine)
    }

    /// The device the network's weights are on.
    pub fn device(&self) -> Device {
        let weight = match &self.network {
            Network::MobileNetV2(_) | Network::EfficientNetLite(_) => {
                self.trunk().map(|t| &t.stem.weight)
            }
            Network::ResNet(m) => Some(&m.parts().0.weight),
            Network::Transformer(vit) => Some(vit.patch_weight()),
        };
        weight.map_or(Device::Cpu, |w| w.device().clone())
    }

    /// Lays the current weights out for the channels-last engine again (after fine-tuning,
    /// which trains them with the engine off), for a CPU-loaded CNN.
    pub fn refresh_channels_last(&mut self) -> candle_core::Result<()> {
        let on_cpu = !matches!(self.network, Network::Transformer(_)) && self.device().is_cpu();
        if on_cpu {
            self.channels_last = self.cpu_engine()?;
        }
        Ok(())
    }

    /// Runs the channels-last engine's dense and pointwise products, or the vision
    /// transformers' linear layers, in `precision` ([`Precision::Bf16`]: bf16 operands summed
    /// in f32, as PyTorch's CPU autocast does; depthwise convolutions, activations, norms and
    /// the output stay f32). On a CUDA GPU bf16 is mixed precision on candle's ops: the CNNs'
    /// activations and convolutions in bf16 (f32 weights cast per layer, the depthwise op and
    /// training batch-norms' statistics in f32, features returned f32), the transformers'
    /// linear layers on bf16 operands. Errors for bf16 on another GPU (Metal), for a CNN off
    /// the engine on the CPU (`--bn train`), or when the CPU lacks AVX512-BF16
    /// ([`BackboneError::Precision`], naming `--precision`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let on_cuda = self.device().is_cuda();
        let set = match (&mut self.channels_last, &mut self.network, precision) {
            (Some(engine), _, _) => engine.set_precision(precision),
            (None, Network::Transformer(vit), _) => vit.set_precision(precision),
            (None, _, Precision::F32) => Ok(()),
            (None, _, Precision::Bf16) if on_cuda => Ok(()),
            (None, _, Precision::Bf16) => Err(candle_core::Error::Msg(format!(
                "bf16 products run on the channels-last CPU engine (MobileNetV2, EfficientNet-Lite, the ResNets on the CPU), in the transformers' linear layers on the CPU, and on CUDA GPUs; {} here runs on candle's ops in f32",
                self.spec.name
            ))),
        };
        set.map_err(|e| BackboneError::Precision {
            precision: precision.name().to_owned(),
            message: e.to_string(),
        })?;
        self.precision = precision;
        Ok(())
    }

    /// The arithmetic of the engine's products ([`Self::set_precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Embeddings `[N, D]` of preprocessed images `[N, 3, H, W]`.
    pub fn embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let (Some(fast), true) = (&self.channels_last, x.device().is_cpu()) {
            return fast.embed(x);
        }
        // Mixed precision on a GPU: the CNNs' activations in bf16 (each layer casts its f32
        // weights; the pooled features come back f32); the transformers cast in their linear
        // layers.
        let cnn_in_bf16 = self.precision == Precision::Bf16
            && !x.device().is_cpu()
            && !matches!(self.network, Network::Transformer(_));
        let x = &match cnn_in_bf16 {
            true => x.to_dtype(candle_core::DType::BF16)?,
            false => x.clone(),
        };
        match &self.network {
            Network::MobileNetV2(m) => m.embed(x),
            Network::EfficientNetLite(m) => m.embed(x),
            Network::ResNet(m) => m.embed(x),
            Network::Transformer(m) => m.embed(x),
        }
    }

    /// Class logits `[N, classes]`, for backbones whose checkpoint carries a classifier.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let classifier = match &self.network {
            Network::MobileNetV2(m) => m.classifier(),
            Network::EfficientNetLite(m) => m.classifier(),
            _ => None,
        };
        classifier.map(|c| c.forward(&self.embed(x)?)).transpose()
    }
}
