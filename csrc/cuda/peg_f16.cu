// The CUDA kernels of the fused PEG for c10::Half (see peg_launch.cuh).
#include "peg_launch.cuh"

#include <c10/util/Half.h>

namespace cpvt {
namespace peg_cuda {
CPVT_PEG_CUDA_INSTANTIATE(c10::Half)
}  // namespace peg_cuda
}  // namespace cpvt
