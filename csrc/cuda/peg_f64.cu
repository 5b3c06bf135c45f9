// The CUDA kernels of the fused PEG for double (see peg_launch.cuh).
#include "peg_launch.cuh"

namespace cpvt {
namespace peg_cuda {
CPVT_PEG_CUDA_INSTANTIATE(double)
}  // namespace peg_cuda
}  // namespace cpvt
