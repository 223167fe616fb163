//! The model zoo: `models/zoo.json`, compiled into the binary, describes every backbone.

use serde::Deserialize;

use super::BackboneError;
use crate::data::Preprocess;

/// The network a zoo entry builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    MobilenetV2,
    EfficientnetLite0,
    Resnet18,
    Resnet34,
    Resnet50,
    VitBasePatch16_224,
    ClipVitB32,
    Dinov2Small,
}

/// A file in a Hugging Face hub repository.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    pub repo: String,
    pub revision: String,
    pub file: String,
}

/// Where a backbone's weights come from by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WeightSource {
    /// From the hub through `hf-hub`.
    Hub(HubFile),
    /// A file relative to the assets folder (see `crate::paths::assets_dir`).
    Local(String),
}

/// One backbone of the zoo.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    pub name: String,
    pub architecture: Architecture,
    pub weights: WeightSource,
    pub input_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub embedding_dim: usize,
    pub licence: String,
    #[serde(default)]
    pub notes: String,
}

impl BackboneSpec {
    /// Whether the network has batch-norms (the CNNs; not the vision transformers).
    pub fn has_batch_norm(&self) -> bool {
        !matches!(
            self.architecture,
            Architecture::VitBasePatch16_224 | Architecture::ClipVitB32 | Architecture::Dinov2Small
        )
    }

    /// The image preprocessing this backbone expects.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            width: self.input_size,
            height: self.input_size,
            mean: self.mean,
            std: self.std,
        }
    }

    /// [`BackboneSpec::preprocess`] at `size` × `size` instead of the backbone's input size
    /// (`--image-size`); sizes under 32 or over [`MAX_IMAGE_SIZE`](super::limits::MAX_IMAGE_SIZE)
    /// are refused.
    pub fn preprocess_at(&self, size: Option<u32>) -> Result<Preprocess, BackboneError> {
        let mut pre = self.preprocess();
        if let Some(size) = size {
            if size < 32 {
                return Err(BackboneError::ImageTooSmall(size));
            }
            if size > super::limits::MAX_IMAGE_SIZE {
                return Err(BackboneError::ImageSizeTooLarge(size));
            }
            pre.width = size;
            pre.height = size;
        }
        Ok(pre)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZooFile {
    backbones: Vec<BackboneSpec>,
}

const ZOO_JSON: &str = include_str!("../../models/zoo.json");

/// Every backbone of the zoo, in file order.
pub fn zoo() -> Vec<BackboneSpec> {
    // The file is compiled in and checked by a unit test, so parsing cannot fail at run time.
    serde_json::from_str::<ZooFile>(ZOO_JSON)
        .expect("models/zoo.json is valid")
        .backbones
}

/// The backbone named `name`, or an error listing the valid names.
pub fn find(name: &str) -> Result<BackboneSpec, BackboneError> {
    let all = zoo();
    all.iter().find(|b| b.name == name).cloned().ok_or_else(|| {
        let names: Vec<_> = all.iter().map(|b| b.name.as_str()).collect();
        BackboneError::Unknown {
            name: name.to_owned(),
            valid: names.join(", "),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoo_parses_and_names_are_unique() {
        let all = zoo();
        assert_eq!(all.len(), 8);
        let mut names: Vec<_> = all.iter().map(|b| b.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 8);
        assert!(all
            .iter()
            .all(|b| b.std.iter().all(|&s| s > 0.0) && b.embedding_dim > 0));
        assert_eq!(find("clip_vit_b32").unwrap().embedding_dim, 512);
        let err = find("vgg").unwrap_err().to_string();
        assert!(err.contains("vgg") && err.contains("resnet18"), "{err}");
    }
}
