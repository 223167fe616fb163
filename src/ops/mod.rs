//! Custom tensor ops that candle lacks or runs slowly, each with its CPU path and (behind
//! features) its GPU kernels in `kernels/`.

pub mod bf16_gemm;
pub mod bf16_linear;
pub mod bias_act;
pub mod depthwise;
#[cfg(feature = "cuda")]
mod depthwise_cuda;
pub mod fused_grad;
pub mod nhwc;
pub mod nhwc_grad;
pub mod packed_gemm;
pub mod stem;
pub mod winograd;

pub use bias_act::bias_act;
pub use depthwise::{depthwise_conv2d, DepthwiseParams};
