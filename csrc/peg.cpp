// Op schemas of the fused PEG and the input checks shared by the C++ backends.
//
//   peg_forward(x, weight, bias, H, W, P) -> out
//     x: (B, P + H*W, C), weight: (C, 1, kh, kw), bias: (C,) or None.
//     out[:, :P] = x[:, :P];  out[:, P:] = dwconv2d(grid(x), weight, bias, zero pad) + grid(x)
//   peg_backward(grad_out, x, weight, H, W, P, output_mask) -> (grad_x, grad_weight, grad_bias)
//     An output whose output_mask entry is false is returned as an empty tensor.
#include "peg.h"

#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <string>

namespace cpvt {

namespace {

// "torch.float32", as Python prints a dtype (the messages are those of cpvt_kernels/_checks.py).
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// "(4, 1, 3, 3)", "(4,)": a shape as Python prints a tuple of it.
std::string shape_str(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += i ? ", " : "";
    out += std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// " = P + H*W" in decimal, exactly as Python prints it, for P >= 0 and H, W >= 1 (the product
// of two int64 fits 127 bits); without 128-bit ints, only where it fits int64.
std::string tokens_total(int64_t P, int64_t H, int64_t W) {
#if defined(__SIZEOF_INT128__)
  unsigned __int128 v = static_cast<unsigned __int128>(H) * static_cast<uint64_t>(W) +
                        static_cast<uint64_t>(P);
  std::string digits;
  do {
    digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  } while (v != 0);
  return " = " + digits;
#else
  int64_t hw = 0, total = 0;
  if (c10::mul_overflows(H, W, &hw) || c10::add_overflows(P, hw, &total)) return "";
  return " = " + std::to_string(total);
#endif
}

void check_sizes(int64_t H, int64_t W, int64_t num_prefix_tokens) {
  TORCH_CHECK_VALUE(H >= 1, "fused_peg: size H must be >= 1, got ", H);
  TORCH_CHECK_VALUE(W >= 1, "fused_peg: size W must be >= 1, got ", W);
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0,
                    "fused_peg: num_prefix_tokens must be >= 0, got ", num_prefix_tokens);
}

void check_tokens(const at::Tensor& t, const char* name, int64_t H, int64_t W,
                  int64_t num_prefix_tokens) {
  TORCH_CHECK_VALUE(t.dim() == 3, "fused_peg: ", name,
                    " must be 3-D (B, num_prefix_tokens + H*W, C), got shape ",
                    shape_str(t.sizes()));
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "fused_peg: ", name,
                   " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
  // H*W may overflow int64 for absurd sizes: compare by division.
  const int64_t grid = t.size(1) - num_prefix_tokens;
  const bool ok = grid >= 1 && grid % W == 0 && grid / W == H;
  TORCH_CHECK_VALUE(ok, "fused_peg: ", name, ".shape[1] must equal num_prefix_tokens + H*W = ",
                    num_prefix_tokens, " + ", H, "*", W, tokens_total(num_prefix_tokens, H, W),
                    ", got ", t.size(1));
}

}  // namespace

void check_forward_inputs(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t H,
                          int64_t W, int64_t num_prefix_tokens) {
  check_sizes(H, W, num_prefix_tokens);
  check_tokens(x, "x", H, W, num_prefix_tokens);
  const int64_t C = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
                    "fused_peg: weight must have shape (C, 1, kh, kw) with C = ", C,
                    " (depthwise), got ", shape_str(weight.sizes()));
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(kh % 2 == 1 && kw % 2 == 1 && kh >= 1 && kw >= 1 &&
                        kh <= kMaxKernelSize && kw <= kMaxKernelSize,
                    "fused_peg: weight kernel size (kh, kw) must be odd and in [1, ",
                    kMaxKernelSize, "], got (", kh, ", ", kw, ")");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "fused_peg: weight dtype must match x (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK(weight.device() == x.device(), "fused_peg: weight must be on the device of x (",
              x.device(), "), got ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C,
                      "fused_peg: bias must have shape (C,) with C = ", C, ", got ",
                      shape_str(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "fused_peg: bias dtype must match x (",
                   dtype_name(x.scalar_type()), "), got ", dtype_name(bias->scalar_type()));
    TORCH_CHECK(bias->device() == x.device(), "fused_peg: bias must be on the device of x (",
                x.device(), "), got ", bias->device());
  }
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight, int64_t H, int64_t W,
                           int64_t num_prefix_tokens) {
  check_forward_inputs(x, weight, std::nullopt, H, W, num_prefix_tokens);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "fused_peg: grad_out must have the shape of x (",
                    shape_str(x.sizes()), "), got ", shape_str(grad_out.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(),
                   "fused_peg: grad_out dtype must match x (", dtype_name(x.scalar_type()),
                   "), got ", dtype_name(grad_out.scalar_type()));
  TORCH_CHECK(grad_out.device() == x.device(), "fused_peg: grad_out must be on the device of x (",
              x.device(), "), got ", grad_out.device());
}

}  // namespace cpvt

TORCH_LIBRARY(cpvt, m) {
  m.def("peg_forward(Tensor x, Tensor weight, Tensor? bias, SymInt H, SymInt W, "
        "int num_prefix_tokens) -> Tensor");
  m.def("peg_backward(Tensor grad_out, Tensor x, Tensor weight, SymInt H, SymInt W, "
        "int num_prefix_tokens, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
