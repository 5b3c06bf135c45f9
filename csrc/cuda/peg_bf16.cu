// The CUDA kernels of the fused PEG for c10::BFloat16 (see peg_launch.cuh).
#include "peg_launch.cuh"

#include <c10/util/BFloat16.h>

namespace cpvt {
namespace peg_cuda {
CPVT_PEG_CUDA_INSTANTIATE(c10::BFloat16)
}  // namespace peg_cuda
}  // namespace cpvt
