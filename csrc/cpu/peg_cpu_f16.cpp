// The float16 CPU kernels (see peg_cpu_impl.h).
#include "peg_cpu_impl.h"

CPVT_CPU_INSTANTIATE(c10::Half)
