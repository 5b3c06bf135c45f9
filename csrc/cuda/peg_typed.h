// The CUDA backend's typed entry points: one translation unit per dtype (peg_<dtype>.cu)
// instantiates them, so nvcc compiles the four dtypes' kernels in parallel; peg_kernel.cu
// dispatches on the dtype and calls them. Tensors are checked and channel-contiguous here.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cpvt {
namespace peg_cuda {

struct DeviceInfo {
  int index;  // the CUDA device
  int sms;
  int64_t smem_optin;  // largest dynamic shared memory a block may opt in to
};

// Which kernels run where both could: the tiled kernels of peg_kernel.cuh, or the streaming
// kernels of peg_stream.cuh (square kernels of size 1 and 3 on the vector path only). kAuto, the
// default, takes the faster family as measured on an H100 (bench/results/2026-12-05_nvidia-h100):
// streaming for the forward and the input gradient alone; for the fused backward, streaming for
// the 16-bit types and tiled for float32 and float64. kPipe (experimental) takes the cp.async
// kernels of peg_pipe.cuh where they apply (3x3 on the vector path: the forward of 16-bit and
// float32 tokens, the backward with the weight gradient of 16-bit ones) and the streaming
// kernels elsewhere, as kStream.
enum class Kernels { kAuto, kTile, kStream, kPipe };

// out = the fused PEG of src (bias may be nullptr); with `flip`, the input gradient of grad_out
// src (flipped taps, no bias). `vec`: src and out allow 16-byte vectors.
template <typename T>
void forward_typed(const at::Tensor& src, const at::Tensor& weight, const at::Tensor* bias,
                   bool flip, at::Tensor& out, int64_t H, int64_t W, int64_t P, bool vec,
                   Kernels kernels, const DeviceInfo& dev, cudaStream_t stream);

// The fused backward with the weight and/or bias gradients; grad_x, grad_w and grad_b are
// nullptr when not wanted (grad_w or grad_b is wanted). `vec`: grad, x and grad_x allow 16-byte
// vectors.
template <typename T>
void backward_typed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                    at::Tensor* grad_x, at::Tensor* grad_w, at::Tensor* grad_b, int64_t H,
                    int64_t W, int64_t P, bool vec, Kernels kernels, int device,
                    const DeviceInfo& dev, cudaStream_t stream);

}  // namespace peg_cuda
}  // namespace cpvt
