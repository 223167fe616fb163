//! `--device auto|cpu|cuda[:N]|metal`.

use candle_core::Device;

/// A `--device` that this build or machine cannot provide.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown --device {0:?}; valid: auto, cpu, cuda, cuda:N, metal")]
    Unknown(String),
    #[error("invalid --device {0:?}: the CUDA ordinal must be a number, e.g. cuda:0")]
    BadOrdinal(String),
    #[error("--device {0}: this build has no CUDA support (build with --features cuda)")]
    NoCuda(String),
    #[error(
        "--device metal: this build has no Metal support (build with --features metal on macOS)"
    )]
    NoMetal,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, DeviceError>;

/// Parses a device name. `auto` picks CUDA device 0, then Metal, then the CPU, among what this
/// build supports (`cuda` / `metal` features) and this machine has: a CUDA build on a machine
/// without a GPU (or driver) falls back to the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok(device);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(device) = Device::new_metal(0) {
                    return Ok(device);
                }
            }
            Ok(Device::Cpu)
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError::NoMetal);
            }
            Ok(Device::new_metal(0)?)
        }
        _ => {
            let Some(rest) = name.strip_prefix("cuda") else {
                return Err(DeviceError::Unknown(name));
            };
            let ordinal = match rest.strip_prefix(':') {
                None if rest.is_empty() => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| DeviceError::BadOrdinal(name.clone()))?,
                None => return Err(DeviceError::Unknown(name)),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NoCuda(name));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("--features cuda"));
        }
        assert!(parse_device("cuda:x").is_err());
    }
}
