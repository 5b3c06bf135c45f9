// The CUDA kernels of the fused PEG for float (see peg_launch.cuh).
#include "peg_launch.cuh"

namespace cpvt {
namespace peg_cuda {
CPVT_PEG_CUDA_INSTANTIATE(float)
}  // namespace peg_cuda
}  // namespace cpvt
