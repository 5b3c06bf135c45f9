// The float32 CPU kernels (see peg_cpu_impl.h).
#include "peg_cpu_impl.h"

CPVT_CPU_INSTANTIATE(float)
