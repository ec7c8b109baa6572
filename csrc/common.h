// Host-side helpers shared by the CPU (.cpp) and CUDA (.cu) implementations of the ops: argument
// checks and the normalised inputs each kernel expects (contiguous, compute dtype, fp32/fp64 weights).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace tldr_fast {

// Features are divided by max(||phi||, kNormEps), as F.normalize does (reference.NORM_EPS).
constexpr double kNormEps = 1e-12;

// The accumulation dtype: fp64 stays fp64 (for gradcheck), every other float computes in fp32 (reference._acc).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// at::parallel_for grain for rows of `row_len` elements: about 16k elements per task.
inline int64_t parallel_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
}

// weights: [n] on the device of `like` -> contiguous, in the accumulation dtype (read by the kernels on the
// device: no host sync).
inline at::Tensor prepare_weights(const at::Tensor& weights, int64_t n, const at::Tensor& like, at::ScalarType acc) {
  check_floating(weights, "weights");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == n, "weights must have shape [", n, "], got ", weights.sizes());
  TORCH_CHECK(weights.device() == like.device(), "weights must be on ", like.device(), ", got ", weights.device());
  return weights.to(acc).contiguous();
}

// head_loss inputs, normalised. N = B (clean rows) or 2B (clean rows, then perturbed rows).
struct HeadLossInputs {
  at::Tensor logits;    // [N, K] contiguous, compute dtype
  at::Tensor condition; // [B, K] contiguous, accumulation dtype
  at::Tensor labels;    // [B] int64 contiguous
  at::Tensor features;  // [B, D] contiguous, compute dtype; undefined without features
  at::Tensor weights;   // [5] accumulation dtype
  at::ScalarType acc;
  int64_t n, b, k, d;   // d = 0 without features
};

// The compute dtype is the promotion of logits' and features' dtypes (they normally agree); the condition is
// read in the accumulation dtype so that a fp32 soft condition keeps its precision next to bf16 logits.
inline HeadLossInputs prepare_head_loss(const at::Tensor& logits, const at::Tensor& condition, const at::Tensor& labels,
                                        const std::optional<at::Tensor>& features, const at::Tensor& weights) {
  check_floating(logits, "logits");
  check_floating(condition, "condition");
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, K], got ", logits.sizes());
  TORCH_CHECK(condition.dim() == 2, "condition must be [B, K], got ", condition.sizes());
  const int64_t n = logits.size(0), k = logits.size(1), b = condition.size(0);
  TORCH_CHECK(b > 0 && k > 0, "head_loss needs B > 0 and K > 0, got condition ", condition.sizes());
  TORCH_CHECK(condition.size(1) == k, "condition must be [B, K] with K = ", k, ", got ", condition.sizes());
  TORCH_CHECK(n == b || n == 2 * b, "logits must have B or 2B rows (B = ", b, "), got ", n);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b, "labels must be [B] with B = ", b, ", got ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(condition.device() == logits.device() && labels.device() == logits.device(),
              "logits, condition and labels must be on one device");
  at::ScalarType compute = logits.scalar_type();
  int64_t d = 0;
  if (features.has_value()) {
    const at::Tensor& f = *features;
    check_floating(f, "features");
    TORCH_CHECK(f.dim() == 2 && f.size(0) == b && f.size(1) > 0, "features must be [B, D] with B = ", b,
                " and D > 0, got ", f.sizes());
    TORCH_CHECK(f.device() == logits.device(), "features must be on ", logits.device());
    compute = at::promote_types(compute, f.scalar_type());
    d = f.size(1);
  }
  const at::ScalarType acc = acc_dtype(compute);
  HeadLossInputs in;
  in.logits = logits.to(compute).contiguous();
  in.condition = condition.to(acc).contiguous();
  in.labels = labels.to(at::kLong).contiguous();
  if (features.has_value()) in.features = features->to(compute).contiguous();
  in.weights = prepare_weights(weights, 5, logits, acc);
  in.acc = acc;
  in.n = n;
  in.b = b;
  in.k = k;
  in.d = d;
  return in;
}

// features: [B, D] with B >= 2 -> contiguous.
inline at::Tensor prepare_feature_loss(const at::Tensor& features) {
  check_floating(features, "features");
  TORCH_CHECK(features.dim() == 2 && features.size(0) >= 2 && features.size(1) > 0,
              "features must be [B, D] with B >= 2 and D > 0, got ", features.sizes());
  return features.contiguous();
}

// labels of feature_loss's same-label form: [B] integers on the features' device -> int64, contiguous. The values
// are checked where a kernel indexes with them (the CPU kernel, on the host); the CUDA kernels only compare
// them, so no host sync reads them there.
inline at::Tensor prepare_labels(const at::Tensor& labels, const at::Tensor& features) {
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0), "labels must be [B] with B = ",
              features.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == features.device(), "labels must be on ", features.device(), ", got ", labels.device());
  return labels.to(at::kLong).contiguous();
}

// images: [B, C, H, W], non-empty -> contiguous (NCHW).
inline at::Tensor prepare_image_prior(const at::Tensor& images) {
  check_floating(images, "images");
  TORCH_CHECK(images.dim() == 4 && images.numel() > 0, "images must be a non-empty [B, C, H, W], got ", images.sizes());
  return images.contiguous();
}

// images of colour_line: [B, 3, H, W] (RGB), non-empty -> contiguous (NCHW).
inline at::Tensor prepare_colour_line(const at::Tensor& images) {
  check_floating(images, "images");
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3 && images.numel() > 0,
              "images must be a non-empty [B, 3, H, W] (RGB), got ", images.sizes());
  return images.contiguous();
}

// The pixel std of image_prior's Moments term is sqrt(max(var, kMomentVarEps)) (reference.MOMENT_VAR_EPS).
constexpr double kMomentVarEps = 1e-12;

// moments of image_prior: [2, C] (mean, std per channel of [0, 1] images) on the images' device -> contiguous,
// in the accumulation dtype.
inline at::Tensor prepare_moments(const at::Tensor& moments, const at::Tensor& images, at::ScalarType acc) {
  check_floating(moments, "moments");
  TORCH_CHECK(moments.dim() == 2 && moments.size(0) == 2 && moments.size(1) == images.size(1),
              "moments must be [2, C] with C = ", images.size(1), ", got ", moments.sizes());
  TORCH_CHECK(moments.device() == images.device(), "moments must be on ", images.device(), ", got ", moments.device());
  return moments.to(acc).contiguous();
}

// activations of bn_stats: [N, C, ...], non-empty -> [N, C, S] contiguous (NCHW; S = the product of the trailing
// sizes, 1 for [N, C]).
inline at::Tensor prepare_bn_stats(const at::Tensor& activations) {
  check_floating(activations, "activations");
  TORCH_CHECK(activations.dim() >= 2 && activations.numel() > 0, "activations must be a non-empty [N, C, ...], got ",
              activations.sizes());
  const int64_t n = activations.size(0), c = activations.size(1);
  return activations.contiguous().view({n, c, activations.numel() / (n * c)});
}

// A small tensor an op reads whole (bn_stats' running statistics and saved mean and coefficients, mode_seek's
// saved coefficients): `sizes` on the device of `x` -> contiguous, in the accumulation dtype. `layout`, `dim` and
// `dim_value` spell the expected shape in the error ("coef must be [2, C] with C = 64").
inline at::Tensor prepare_small(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const char* layout,
                                const char* dim, int64_t dim_value, const at::Tensor& x, at::ScalarType acc) {
  check_floating(t, name);
  TORCH_CHECK(t.sizes() == sizes, name, " must be ", layout, " with ", dim, " = ", dim_value, ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  return t.to(acc).contiguous();
}

// A per-channel tensor of bn_stats (running_mean, running_var, mean): [C] of `x` [N, C, S].
inline at::Tensor prepare_channel_stat(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType acc) {
  return prepare_small(t, name, {x.size(1)}, "[C]", "C", x.size(1), x, acc);
}

// mode_seek's inputs. images: [B, ...] with B >= 2, non-empty rows -> [B, P] contiguous; latents: [B, ...] with
// the same B, non-empty rows, on the images' device -> [B, Q] contiguous in the accumulation dtype (they are small).
inline at::Tensor prepare_mode_seek_images(const at::Tensor& images) {
  check_floating(images, "images");
  TORCH_CHECK(images.dim() >= 2 && images.size(0) >= 2 && images.numel() > 0,
              "images must be [B, ...] with B >= 2 and non-empty rows, got ", images.sizes());
  const int64_t b = images.size(0);
  return images.contiguous().view({b, images.numel() / b});
}

inline at::Tensor prepare_mode_seek_latents(const at::Tensor& latents, const at::Tensor& x, at::ScalarType acc) {
  check_floating(latents, "latents");
  TORCH_CHECK(latents.dim() >= 2 && latents.size(0) == x.size(0) && latents.numel() > 0,
              "latents must be [B, ...] with B = ", x.size(0), " and non-empty rows, got ", latents.sizes());
  TORCH_CHECK(latents.device() == x.device(), "latents must be on ", x.device(), " like images, got ", latents.device());
  const int64_t b = latents.size(0);
  return latents.to(acc).contiguous().view({b, latents.numel() / b});
}

// The upstream gradient of a scalar value: one element on the device of `x` -> [] in the accumulation dtype.
inline at::Tensor prepare_scalar_grad(const at::Tensor& grad, const at::Tensor& x, at::ScalarType acc) {
  check_floating(grad, "grad");
  TORCH_CHECK(grad.numel() == 1, "grad must have one element (the gradient of the value), got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "grad must be on ", x.device(), ", got ", grad.device());
  return grad.to(acc).reshape({});
}

// mode_seek's epsilons (reference.mode_seek): dz_i = max(d_z(i), kModeSeekDzEps), value = 1 / (S + kModeSeekEps).
constexpr double kModeSeekDzEps = 1e-12;
constexpr double kModeSeekEps = 1e-5;

}  // namespace tldr_fast
