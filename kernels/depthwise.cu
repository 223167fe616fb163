// Depthwise 2-D convolution (one filter per channel), f32, contiguous NCHW tensors.
// Forward and both gradients; the CPU path in src/ops/depthwise.rs is the reference.
// Geometry: stride (sh, sw), padding top/left (pt, pl); bottom/right padding is implied by the
// output size (oh, ow).

// The forward and input-gradient kernels run 1 024-thread blocks (candle's for_num_elems);
// the weight-gradient kernel 256-thread blocks. __launch_bounds__ lets the compiler fit the
// registers to those sizes (without it a 1 024-thread launch can fail with too many resources).
extern "C" __global__ void __launch_bounds__(1024) depthwise_fwd_f32(
    const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
    int n, int c, int h, int wd, int kh, int kw, int oh, int ow,
    int sh, int sw, int pt, int pl) {
  long total = (long)n * c * oh * ow;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ox = i % ow;
    int oy = (i / ow) % oh;
    long plane = i / ((long)ow * oh);
    int ch = plane % c;
    const float* in = x + plane * h * wd;
    const float* f = w + (long)ch * kh * kw;
    float acc = 0.f;
    for (int ky = 0; ky < kh; ++ky) {
      int iy = oy * sh + ky - pt;
      if (iy < 0 || iy >= h) continue;
      for (int kx = 0; kx < kw; ++kx) {
        int ix = ox * sw + kx - pl;
        if (ix < 0 || ix >= wd) continue;
        acc += in[(long)iy * wd + ix] * f[ky * kw + kx];
      }
    }
    y[i] = acc;
  }
}

// grad_x[n,c,iy,ix] = sum over taps (ky,kx) whose output position is integral and in range.
extern "C" __global__ void __launch_bounds__(1024) depthwise_bwd_input_f32(
    const float* __restrict__ gy, const float* __restrict__ w, float* __restrict__ gx,
    int n, int c, int h, int wd, int kh, int kw, int oh, int ow,
    int sh, int sw, int pt, int pl) {
  long total = (long)n * c * h * wd;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ix = i % wd;
    int iy = (i / wd) % h;
    long plane = i / ((long)wd * h);
    int ch = plane % c;
    const float* g = gy + plane * oh * ow;
    const float* f = w + (long)ch * kh * kw;
    float acc = 0.f;
    for (int ky = 0; ky < kh; ++ky) {
      int ty = iy + pt - ky;
      if (ty < 0 || ty % sh != 0) continue;
      int oy = ty / sh;
      if (oy >= oh) continue;
      for (int kx = 0; kx < kw; ++kx) {
        int tx = ix + pl - kx;
        if (tx < 0 || tx % sw != 0) continue;
        int ox = tx / sw;
        if (ox >= ow) continue;
        acc += g[(long)oy * ow + ox] * f[ky * kw + kx];
      }
    }
    gx[i] = acc;
  }
}

// grad_w[c,0,ky,kx] = sum_n sum_(oy,ox) gy[n,c,oy,ox] * x[n,c,oy*sh+ky-pt,ox*sw+kx-pl].
// One block per weight element; threads stride over (n, oy, ox), then reduce in shared memory.
extern "C" __global__ void __launch_bounds__(256) depthwise_bwd_weight_f32(
    const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ gw,
    int n, int c, int h, int wd, int kh, int kw, int oh, int ow,
    int sh, int sw, int pt, int pl) {
  extern __shared__ float partial[];
  int widx = blockIdx.x;
  int kx = widx % kw;
  int ky = (widx / kw) % kh;
  int ch = widx / (kw * kh);
  long per_image = (long)oh * ow;
  long total = (long)n * per_image;
  float acc = 0.f;
  for (long j = threadIdx.x; j < total; j += blockDim.x) {
    int b = j / per_image;
    long r = j % per_image;
    int oy = r / ow;
    int ox = r % ow;
    int iy = oy * sh + ky - pt;
    int ix = ox * sw + kx - pl;
    if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
    long plane = (long)b * c + ch;
    acc += gy[plane * per_image + r] * x[plane * h * wd + (long)iy * wd + ix];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[widx] = partial[0];
}
