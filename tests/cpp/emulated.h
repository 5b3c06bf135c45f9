// What the emulated-kernel tests share (test_stream_emulated.cpp, test_pipe_emulated.cpp): a
// check counter, the dtype helpers, the error measure and the weight's Params.
#pragma once

// The ATen headers of what the tests call, not <torch/torch.h>: the sanitized builds instrument
// every inline function a translation unit holds, and torch.h's took them about 5 minutes each
// on 2 cores.
#include <ATen/Context.h>
#include <ATen/TensorIndexing.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/peg_kernel.cuh"

#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>

namespace emulated {

inline int checks = 0, failures = 0;

inline void expect(bool ok, const std::string& what) {
  if (!ok) std::printf("FAIL: %s\n", what.c_str());
  ++checks;
  if (!ok) ++failures;
}

template <typename T>
at::ScalarType scalar_type() {
  return c10::CppTypeToScalarType<T>::value;
}

template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, c10::Half>) return 2e-3;
  return 1.6e-2;
}

// max |a - ref| / max |ref|, NaN where a is NaN and ref is not.
inline double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const auto a64 = a.to(at::kDouble), r64 = ref.to(at::kDouble);
  if ((a64.isnan() != r64.isnan()).any().item<bool>()) return NAN;
  const auto ok = r64.isfinite() & a64.isfinite();
  if ((a64.isinf() != r64.isinf()).any().item<bool>()) return NAN;
  const double denom = r64.where(ok, 0.0).abs().max().item<double>();
  const double diff = (a64 - r64).where(ok, 0.0).abs().max().item<double>();
  return denom > 0 ? diff / denom : diff;
}

// The kernels' Params of a (C, 1, kh, kw) weight and an optional (C,) bias.
template <typename T>
cpvt::peg_cuda::Params<T> params_of(const at::Tensor& w, const at::Tensor* b) {
  cpvt::peg_cuda::Params<T> p{};
  p.weight = w.const_data_ptr<T>();
  p.w_sc = w.stride(0);
  p.w_si = w.stride(2);
  p.w_sj = w.stride(3);
  p.bias = b != nullptr ? b->const_data_ptr<T>() : nullptr;
  p.b_s = b != nullptr ? b->stride(0) : 0;
  return p;
}

}  // namespace emulated
