// The CPU op of the fused PEG: input checks, the dtype dispatch to the kernels (compiled per
// dtype in peg_cpu_<dtype>.cpp from peg_cpu_impl.h) and the registration with the dispatcher.
#include "../peg.h"
#include "peg_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#if defined(__linux__) && defined(__GLIBC__)
#include <dlfcn.h>
#include <gnu/libc-version.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace cpvt {
namespace cpu {
int64_t env_bytes(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  // Digits only: strtoll alone would also take leading spaces and a sign.
  const bool digits = std::all_of(env, env + std::strlen(env), [](char ch) {
    return ch >= '0' && ch <= '9';
  });
  errno = 0;
  const long long v = digits ? std::strtoll(env, nullptr, 10) : -1;
  TORCH_CHECK(digits && errno == 0, name, " must be a number of bytes, got '", env, "'");
  return v;
}

std::optional<bool> env_flag(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return std::nullopt;
  const bool on = std::strcmp(env, "1") == 0;
  TORCH_CHECK(on || std::strcmp(env, "0") == 0, name, " must be 0 or 1, got '", env, "'");
  return on;
}

namespace {

Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t H, int64_t W,
                       int64_t P) {
  Geometry g;
  g.B = x.size(0); g.N = x.size(1); g.C = x.size(2);
  g.H = H; g.W = W; g.P = P;
  g.kh = weight.size(2); g.kw = weight.size(3);
  g.ph = g.kh / 2; g.pw = g.kw / 2;
  g.sb = x.stride(0); g.st = x.stride(1);
  return g;
}

// The output size from which a fresh output gets transparent huge pages (advise_huge_pages):
// CPVT_CPU_HUGE_PAGE_BYTES (a number of bytes; 0 never), or 32 MiB.
int64_t huge_page_threshold() { return env_bytes("CPVT_CPU_HUGE_PAGE_BYTES", int64_t(32) << 20); }

#if defined(__linux__) && defined(__GLIBC__) && defined(MADV_HUGEPAGE)
// Whether c10's CPU allocator (posix_memalign) is glibc's malloc, not an allocator preloaded in
// its place (jemalloc, tcmalloc: they keep freed memory for reuse and manage huge pages
// themselves).
bool glibc_allocator() {
  static const bool glibc = [] {
    Dl_info alloc{}, libc{};
    void* f = dlsym(RTLD_DEFAULT, "posix_memalign");
    return f != nullptr && dladdr(f, &alloc) != 0 &&
           dladdr(reinterpret_cast<void*>(&gnu_get_libc_version), &libc) != 0 &&
           alloc.dli_fbase == libc.dli_fbase;
  }();
  return glibc;
}
#endif

// A large output is usually fresh memory: glibc maps every block above 32 MiB (its largest mmap
// threshold) anew, and unmaps it when it is freed. Every 4 KiB page of it then faults on its
// first write, which costs more than the kernel's own work: on a 2-core KVM guest, 13850 faults
// took 8-9 ms for a 54 MiB output that takes 1.7 ms to copy into memory already mapped. Where
// the output is at least huge_page_threshold() bytes, is such a block of glibc's own mapping
// (not its brk heap, and glibc is the allocator), and its first 2 MiB page is not in memory yet,
// this asks the kernel for transparent huge pages over its whole 2 MiB pages, so that it faults
// once per 2 MiB (1.7-3x faster at 48-216 MiB there). The advice ends with the mapping when the
// tensor is freed; memory an allocator keeps and reuses never gets it. Without THP, or off
// Linux and glibc, nothing happens.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(__GLIBC__) && defined(MADV_HUGEPAGE)
  const int64_t threshold = huge_page_threshold();
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (threshold <= 0 || bytes < threshold || !glibc_allocator()) return;
  constexpr uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  // The brk heap lies below the break (mmap regions above it): a block there outlives the
  // tensor in glibc's free lists, so it is left as it is.
  if (p < reinterpret_cast<uintptr_t>(sbrk(0))) return;
  const uintptr_t begin = (p + huge - 1) & ~(huge - 1);
  const uintptr_t end = (p + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  if (end <= begin) return;
  unsigned char resident = 1;
  if (mincore(reinterpret_cast<void*>(begin), 1, &resident) != 0 || (resident & 1)) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)huge_page_threshold;
  (void)t;
#endif
}

// Every CPVT_CPU_* variable, checked at each call before any kernel runs: a bad value is an
// error whichever path the call takes (each path reads its own again, which then cannot fail
// inside a parallel loop).
void check_switches() {
  for (const char* name : {"CPVT_CPU_PREFETCH", "CPVT_CPU_NARROW_BLOCKS", "CPVT_CPU_IN_PLACE",
                           "CPVT_CPU_BF16_DOT"}) {
    env_flag(name);
  }
  for (const char* name : {"CPVT_CPU_STREAM_BYTES", "CPVT_CPU_HUGE_PAGE_BYTES",
                           "CPVT_CPU_PARTIALS_BYTES"}) {
    env_bytes(name, 0);
  }
}

// Kernels read channels contiguously; any batch and token strides are fine.
at::Tensor channels_contiguous(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

at::Tensor peg_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t H, int64_t W,
                           int64_t P) {
  check_forward_inputs(x_in, weight, bias, H, W, P);
  check_switches();
  const at::Tensor x = channels_contiguous(x_in);
  const Geometry g = make_geometry(x, weight, H, W, P);
  at::Tensor out = at::empty({g.B, g.N, g.C}, x.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_forward_cpu", [&] {
    forward_typed<scalar_t>(x, weight, bias, g, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> peg_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, int64_t H,
    int64_t W, int64_t P, std::array<bool, 3> output_mask) {
  check_backward_inputs(grad_out_in, x_in, weight, H, W, P);
  check_switches();
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  const at::Tensor x = channels_contiguous(x_in);
  const Geometry gx = make_geometry(x, weight, H, W, P);
  const Geometry gg = make_geometry(grad_out, weight, H, W, P);
  const int64_t C = gx.C, kh = gx.kh, kw = gx.kw;
  // Masked-out outputs are distinct empty tensors (outputs must not alias one another).
  at::Tensor grad_x = output_mask[0] ? at::empty({gx.B, gx.N, C}, x.options())
                                      : at::empty({0}, x.options());
  at::Tensor grad_w = output_mask[1] ? at::empty({C, 1, kh, kw}, weight.options())
                                      : at::empty({0}, x.options());
  at::Tensor grad_b = output_mask[2] ? at::empty({C}, weight.options())
                                      : at::empty({0}, x.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_x, grad_w, grad_b};
  if (output_mask[0] && grad_x.numel() == 0) output_mask[0] = false;
  if (output_mask[0]) advise_huge_pages(grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_backward_cpu", [&] {
    backward_typed<scalar_t>(grad_out, x, weight, gg, gx, output_mask, grad_x, grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace cpvt

TORCH_LIBRARY_IMPL(cpvt, CPU, m) {
  m.impl("peg_forward", &cpvt::cpu::peg_forward_cpu);
  m.impl("peg_backward", &cpvt::cpu::peg_backward_cpu);
}
