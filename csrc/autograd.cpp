// Autograd of the loss ops, in C++ (the Autograd dispatch key, for CPU and CUDA alike). Each op's kernels
// already wrote d loss / d input in the forward, so the backward only scales those saved gradients, and
// the terms (d loss / d weights), by the upstream gradient of `loss`:
//
//   d/d input = grad_loss * grad_<input>,   d/d weights = grad_loss * terms   (outputs 1.. carry no gradient)
//
// In C++ rather than torch.library.register_autograd in Python: the Python rule cost 100-300 us of host
// time per op and backward (benchmarks/host_overhead.py), more than the kernels at B = 1024. The fake
// (meta) rules stay in Python (tldr_fast/extension.py), which torch.compile uses to trace through this.
//
// bn_stats is not a loss op: its forward returns (value, mean, coef) and its backward is one elementwise pass,
// the helper op tldr_fast::bn_stats_backward (called through the dispatcher: CPU and CUDA alike):
//
//   d/d activations = bn_stats_backward(grad_value, activations, mean, coef)   (mean, coef carry no gradient;
//   running_mean and running_var get none: they are buffers)
//
// mode_seek likewise: its forward returns (value, coef) and its backward is the helper op
// tldr_fast::mode_seek_backward:
//
//   d/d images = mode_seek_backward(grad_value, images, coef)   (coef carries no gradient; latents get none:
//   they are sampled noise)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace tldr_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

// Forward half shared by the ops: `outputs` = (loss, terms, grad_<input>...) of the op called below autograd.
variable_list save_outputs(AutogradContext* ctx, variable_list outputs, at::ScalarType weights_dtype) {
  variable_list saved(outputs.begin() + 1, outputs.end());  // terms, grads
  ctx->save_for_backward(saved);
  ctx->mark_non_differentiable(saved);
  ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
  ctx->saved_data["weights_dtype"] = static_cast<int64_t>(weights_dtype);
  return outputs;
}

// Backward half: one gradient per forward argument. `args_defined[i]`: argument i is a defined tensor (an
// autograd edge); `grad_args[j]`: the argument that saved gradient j is the gradient of; `weights_arg`: the
// weights' argument.
variable_list scale_saved(AutogradContext* ctx, const variable_list& grad_outputs, const std::vector<bool>& args_defined,
                          const std::vector<int64_t>& grad_args, int64_t weights_arg) {
  variable_list out(args_defined.size());
  const Tensor& grad_loss = grad_outputs[0];
  if (!grad_loss.defined()) return out;  // the loss does not reach what is being differentiated
  std::vector<int64_t> edge(args_defined.size(), -1);  // argument -> autograd edge (needs_input_grad's index)
  int64_t next = 0;
  for (size_t i = 0; i < args_defined.size(); ++i)
    if (args_defined[i]) edge[i] = next++;
  const auto needs = [&](int64_t arg) { return edge[arg] >= 0 && ctx->needs_input_grad(edge[arg]); };
  const variable_list saved = ctx->get_saved_variables();  // terms, grads
  for (size_t j = 0; j < grad_args.size(); ++j)
    if (needs(grad_args[j])) out[grad_args[j]] = grad_loss * saved[1 + j];
  if (needs(weights_arg))
    out[weights_arg] = (grad_loss * saved[0]).to(static_cast<at::ScalarType>(ctx->saved_data["weights_dtype"].toInt()));
  return out;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using HeadLossOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using HeadLossSig = HeadLossOut(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, bool);
using TripleOut = std::tuple<Tensor, Tensor, Tensor>;
using FeatureLossSig = TripleOut(const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t);
using ImagePriorSig = TripleOut(const Tensor&, const Tensor&, double, double, const std::optional<Tensor>&);
using BnStatsSig = TripleOut(const Tensor&, const Tensor&, const Tensor&);
using BnStatsBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using PairOut = std::tuple<Tensor, Tensor>;
using ModeSeekSig = PairOut(const Tensor&, const Tensor&);
using ModeSeekBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

struct HeadLoss : torch::autograd::Function<HeadLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& condition, const Tensor& labels,
                               const std::optional<Tensor>& features, const Tensor& weights, bool head_bias) {
    static const auto op = op_handle<HeadLossSig>("tldr_fast::head_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, terms, gz, gf] = op.call(logits, condition, labels, features, weights, head_bias);
    ctx->saved_data["has_features"] = features.has_value() && features->defined();
    return save_outputs(ctx, {loss, terms, gz, gf}, weights.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool has_f = ctx->saved_data["has_features"].toBool();
    return scale_saved(ctx, grad_outputs, {true, true, true, has_f, true, false}, {0, 3}, 4);
  }
};

struct FeatureLoss : torch::autograd::Function<FeatureLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& features, const Tensor& weights,
                               const std::optional<Tensor>& labels, int64_t num_classes) {
    static const auto op = op_handle<FeatureLossSig>("tldr_fast::feature_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, terms, gf] = op.call(features, weights, labels, num_classes);
    ctx->saved_data["has_labels"] = labels.has_value() && labels->defined();
    return save_outputs(ctx, {loss, terms, gf}, weights.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool has_labels = ctx->saved_data["has_labels"].toBool();
    return scale_saved(ctx, grad_outputs, {true, true, has_labels, false}, {0}, 1);
  }
};

struct ImagePrior : torch::autograd::Function<ImagePrior> {
  static variable_list forward(AutogradContext* ctx, const Tensor& images, const Tensor& weights, double lo, double hi,
                               const std::optional<Tensor>& moments) {
    static const auto op = op_handle<ImagePriorSig>("tldr_fast::image_prior");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, terms, gx] = op.call(images, weights, lo, hi, moments);
    ctx->saved_data["has_moments"] = moments.has_value() && moments->defined();
    return save_outputs(ctx, {loss, terms, gx}, weights.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool has_moments = ctx->saved_data["has_moments"].toBool();
    return scale_saved(ctx, grad_outputs, {true, true, false, false, has_moments}, {0}, 1);
  }
};

// Forward half of the value ops (bn_stats, mode_seek): `outputs` = (value, saved...) of the op called below
// autograd on `x, ...`; x and the saved outputs are kept for the backward, the saved outputs carry no gradient.
variable_list save_value_outputs(AutogradContext* ctx, const Tensor& x, variable_list outputs) {
  variable_list saved(outputs.begin() + 1, outputs.end());
  ctx->mark_non_differentiable(saved);
  saved.insert(saved.begin(), x);
  ctx->save_for_backward(saved);  // x, saved outputs
  ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
  return outputs;
}

// Backward half: one gradient per forward argument, only x's: `backward_op(grad_value, x, saved outputs...)`.
template <typename F>
variable_list value_backward(AutogradContext* ctx, const variable_list& grad_outputs, size_t n_args, F backward_op) {
  variable_list out(n_args);
  const Tensor& grad_value = grad_outputs[0];
  if (grad_value.defined() && ctx->needs_input_grad(0)) out[0] = backward_op(grad_value, ctx->get_saved_variables());
  return out;
}

struct BnStats : torch::autograd::Function<BnStats> {
  static variable_list forward(AutogradContext* ctx, const Tensor& activations, const Tensor& running_mean,
                               const Tensor& running_var) {
    static const auto op = op_handle<BnStatsSig>("tldr_fast::bn_stats");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, mean, coef] = op.call(activations, running_mean, running_var);
    return save_value_outputs(ctx, activations, {value, mean, coef});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = op_handle<BnStatsBackwardSig>("tldr_fast::bn_stats_backward");
    return value_backward(ctx, grad_outputs, 3, [](const Tensor& g, const variable_list& saved) {
      return op.call(g, saved[0], saved[1], saved[2]);  // activations, mean, coef
    });
  }
};

struct ModeSeek : torch::autograd::Function<ModeSeek> {
  static variable_list forward(AutogradContext* ctx, const Tensor& images, const Tensor& latents) {
    static const auto op = op_handle<ModeSeekSig>("tldr_fast::mode_seek");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, coef] = op.call(images, latents);
    return save_value_outputs(ctx, images, {value, coef});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = op_handle<ModeSeekBackwardSig>("tldr_fast::mode_seek_backward");
    return value_backward(ctx, grad_outputs, 2, [](const Tensor& g, const variable_list& saved) {
      return op.call(g, saved[0], saved[1]);  // images, coef
    });
  }
};

HeadLossOut head_loss_autograd(const Tensor& logits, const Tensor& condition, const Tensor& labels,
                               const std::optional<Tensor>& features, const Tensor& weights, bool head_bias) {
  const variable_list r = HeadLoss::apply(logits, condition, labels, features, weights, head_bias);
  return {r[0], r[1], r[2], r[3]};
}

TripleOut feature_loss_autograd(const Tensor& features, const Tensor& weights, const std::optional<Tensor>& labels,
                                int64_t num_classes) {
  const variable_list r = FeatureLoss::apply(features, weights, labels, num_classes);
  return {r[0], r[1], r[2]};
}

TripleOut image_prior_autograd(const Tensor& images, const Tensor& weights, double lo, double hi,
                               const std::optional<Tensor>& moments) {
  const variable_list r = ImagePrior::apply(images, weights, lo, hi, moments);
  return {r[0], r[1], r[2]};
}

TripleOut bn_stats_autograd(const Tensor& activations, const Tensor& running_mean, const Tensor& running_var) {
  const variable_list r = BnStats::apply(activations, running_mean, running_var);
  return {r[0], r[1], r[2]};
}

PairOut mode_seek_autograd(const Tensor& images, const Tensor& latents) {
  const variable_list r = ModeSeek::apply(images, latents);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tldr_fast, Autograd, m) {
  m.impl("head_loss", &head_loss_autograd);
  m.impl("feature_loss", &feature_loss_autograd);
  m.impl("image_prior", &image_prior_autograd);
  m.impl("bn_stats", &bn_stats_autograd);
  m.impl("mode_seek", &mode_seek_autograd);
}

}  // namespace tldr_fast
