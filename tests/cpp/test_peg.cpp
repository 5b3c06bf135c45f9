// Calls the fused PEG through the dispatcher, as a C++ user would, and checks it against
// libtorch's own depthwise convolution (the PEG's definition), forward and backward.
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/randn.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  ++checks;
  if (!ok) ++failures;
}

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const double denom = ref.abs().max().item<double>();
  const double diff = (a.to(at::kDouble) - ref).abs().max().item<double>();
  return denom > 0 ? diff / denom : diff;
}

at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                     int64_t H, int64_t W, int64_t P) {
  const int64_t B = x.size(0), C = x.size(2);
  auto grid = x.narrow(1, P, H * W).transpose(1, 2).reshape({B, C, H, W});
  auto y = at::conv2d(grid, w, b, {1, 1}, {w.size(2) / 2, w.size(3) / 2}, {1, 1}, C) + grid;
  return at::cat({x.narrow(1, 0, P), y.flatten(2).transpose(1, 2)}, 1);
}

void run_case(int64_t B, int64_t P, int64_t H, int64_t W, int64_t C, int64_t k, at::ScalarType dt,
              double tol) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("cpvt::peg_forward", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, c10::SymInt,
                                          c10::SymInt, int64_t)>();
  static auto bwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("cpvt::peg_backward", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                            c10::SymInt, int64_t, std::array<bool, 3>)>();
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x64 = at::randn({B, P + H * W, C}, opts).to(dt).to(at::kDouble).requires_grad_();
  auto w64 = (at::randn({C, 1, k, k}, opts) / k).to(dt).to(at::kDouble).requires_grad_();
  auto b64 = at::randn({C}, opts).to(dt).to(at::kDouble).requires_grad_();
  auto g64 = at::randn({B, P + H * W, C}, opts).to(dt).to(at::kDouble);
  auto ref = reference(x64, w64, b64, H, W, P);
  ref.backward(g64);

  auto x = x64.detach().to(dt), w = w64.detach().to(dt), b = b64.detach().to(dt);
  auto out = fwd.call(x, w, b, H, W, P);
  auto [gx, gw, gb] = bwd.call(g64.to(dt), x, w, H, W, P, {true, true, true});
  char name[160];
  std::snprintf(name, sizeof(name), "B=%ld P=%ld %ldx%ld C=%ld k=%ld %s", (long)B, (long)P,
                (long)H, (long)W, (long)C, (long)k, c10::toString(dt));
  expect(rel_err(out, ref.detach()) < tol, std::string(name) + " output");
  expect(rel_err(gx, x64.grad()) < tol, std::string(name) + " grad_x");
  expect(rel_err(gw, w64.grad()) < tol, std::string(name) + " grad_weight");
  expect(rel_err(gb, b64.grad()) < tol, std::string(name) + " grad_bias");
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_case(2, 1, 14, 14, 192, 3, at::kFloat, 1e-5);
  run_case(3, 0, 7, 9, 33, 7, at::kFloat, 1e-5);
  run_case(1, 2, 5, 5, 17, 5, at::kDouble, 1e-12);
  run_case(2, 1, 6, 4, 64, 3, at::kBFloat16, 1.6e-2);
  // Bad input reaches the C++ checks, which throw a ValueError naming the argument.
  bool threw = false;
  try {
    auto x = at::randn({2, 10, 4});
    auto w = at::randn({4, 1, 3, 3});
    c10::Dispatcher::singleton()
        .findSchemaOrThrow("cpvt::peg_forward", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          c10::SymInt, c10::SymInt, int64_t)>()
        .call(x, w, std::nullopt, 3, 4, 1);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("x.shape[1]") != std::string::npos;
  }
  expect(threw, "x.shape[1] mismatch raises c10::ValueError naming x.shape[1]");
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
