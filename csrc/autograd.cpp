// Autograd of the fused ops, in C++ (the Autograd dispatch key, for CPU and CUDA alike), one template per
// kind of op; an op is one line of the registration at the end.
//
// A loss op's kernels already wrote d loss / d input in the forward, so the backward only scales those saved
// gradients, and the terms (d loss / d weights), by the upstream gradient of `loss` (LossAutograd):
//
//   d/d input = grad_loss * grad_<input>,   d/d weights = grad_loss * terms   (outputs 1.. carry no gradient)
//
// A value op (bn_stats, mode_seek, colour_line) returns (value, saved...) and its backward is one elementwise pass, its helper
// op <op>_backward (called through the dispatcher: CPU and CUDA alike; ValueAutograd):
//
//   d/d x = <op>_backward(grad_value, x, saved...)   (x: the first argument; the saved outputs carry no gradient
//   and the other arguments get none: bn_stats' running statistics are buffers, mode_seek's latents noise)
//
// In C++ rather than torch.library.register_autograd in Python: a Python rule costs 100-300 us of host
// time per op and backward (benchmarks/benchmark_host_overhead.py), more than the kernels at B = 1024. The fake
// (meta) rules stay in Python (tldr_fast/extension.py), which torch.compile uses to trace through this.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace tldr_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// An op's outputs (a std::tuple of tensors) as a list, and back.
template <typename Out>
variable_list to_list(const Out& out) {
  return std::apply([](const auto&... t) { return variable_list{t...}; }, out);
}

template <typename Out, size_t... I>
Out to_tuple(const variable_list& r, std::index_sequence<I...>) {
  return Out{r[I]...};
}

// Which arguments are defined tensors (autograd edges), as a bit mask: the arguments' order as
// torch::autograd::Function numbers its inputs.
template <typename... Args>
int64_t defined_args(const Args&... args) {
  std::vector<bool> is_var;
  variable_list vars;
  torch::autograd::extract_vars(is_var, vars, args...);
  int64_t mask = 0;
  for (size_t i = 0; i < is_var.size(); ++i)
    if (is_var[i]) mask |= int64_t{1} << i;
  return mask;
}

// The autograd of the fused loss op `Name` ("tldr_fast::<op>") with C++ signature `Sig`, whose outputs are
// (loss, terms, grad_<input>...): the saved gradient j is that of argument GradArgs[j], and argument WeightsArg
// holds the weights.
template <const char* Name, typename Sig, int64_t WeightsArg, int64_t... GradArgs>
struct LossAutograd;

template <const char* Name, typename Out, typename... Args, int64_t WeightsArg, int64_t... GradArgs>
struct LossAutograd<Name, Out(Args...), WeightsArg, GradArgs...>
    : torch::autograd::Function<LossAutograd<Name, Out(Args...), WeightsArg, GradArgs...>> {
  static variable_list forward(AutogradContext* ctx, Args... args) {
    static const auto op = op_handle<Out(Args...)>(Name);
    ctx->saved_data["defined_args"] = defined_args(args...);
    ctx->saved_data["weights_dtype"] =
        static_cast<int64_t>(std::get<WeightsArg>(std::forward_as_tuple(args...)).scalar_type());
    variable_list outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outputs = to_list(op.call(args...));
    }
    variable_list saved(outputs.begin() + 1, outputs.end());  // terms, grads
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable(saved);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    return outputs;
  }

  // One gradient per forward argument; needs_input_grad counts the defined tensor arguments only.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(sizeof...(Args));
    const Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return out;  // the loss does not reach what is being differentiated
    const int64_t defined = ctx->saved_data["defined_args"].toInt();
    const auto needs = [&](int64_t arg) {
      if (!((defined >> arg) & 1)) return false;
      int64_t edge = 0;  // the defined tensor arguments before `arg`
      for (int64_t i = 0; i < arg; ++i) edge += (defined >> i) & 1;
      return ctx->needs_input_grad(edge);
    };
    const variable_list saved = ctx->get_saved_variables();  // terms, grads
    constexpr int64_t grad_args[] = {GradArgs...};
    for (size_t j = 0; j < sizeof...(GradArgs); ++j)
      if (needs(grad_args[j])) out[grad_args[j]] = grad_loss * saved[1 + j];
    if (needs(WeightsArg))
      out[WeightsArg] = (grad_loss * saved[0]).to(static_cast<at::ScalarType>(ctx->saved_data["weights_dtype"].toInt()));
    return out;
  }

  // The Autograd kernel of the op.
  static Out call(Args... args) {
    const variable_list r = LossAutograd::apply(args...);
    return to_tuple<Out>(r, std::make_index_sequence<std::tuple_size_v<Out>>{});
  }
};

template <size_t>
using TensorArg = const Tensor&;

// The autograd of the fused value op `Name` with C++ signature `Sig`, whose outputs are (value, saved...), and
// whose backward is the op `Backward`: (grad_value, x, saved...) -> d value / d x, with x the first argument.
template <const char* Name, const char* Backward, typename Sig>
struct ValueAutograd;

template <const char* Name, const char* Backward, typename Out, typename... Args>
struct ValueAutograd<Name, Backward, Out(Args...)> : torch::autograd::Function<ValueAutograd<Name, Backward, Out(Args...)>> {
  static constexpr size_t kSaved = std::tuple_size_v<Out> - 1;

  static variable_list forward(AutogradContext* ctx, Args... args) {
    static const auto op = op_handle<Out(Args...)>(Name);
    variable_list outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outputs = to_list(op.call(args...));
    }
    variable_list saved(outputs.begin() + 1, outputs.end());
    ctx->mark_non_differentiable(saved);
    saved.insert(saved.begin(), std::get<0>(std::forward_as_tuple(args...)));
    ctx->save_for_backward(saved);  // x, saved outputs
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(sizeof...(Args));
    const Tensor& grad_value = grad_outputs[0];
    if (grad_value.defined() && ctx->needs_input_grad(0))
      out[0] = call_backward(grad_value, ctx->get_saved_variables(), std::make_index_sequence<kSaved + 1>{});
    return out;
  }

  template <size_t... I>
  static Tensor call_backward(const Tensor& grad, const variable_list& saved, std::index_sequence<I...>) {
    static const auto op = op_handle<Tensor(const Tensor&, TensorArg<I>...)>(Backward);
    return op.call(grad, saved[I]...);
  }

  // The Autograd kernel of the op.
  static Out call(Args... args) {
    const variable_list r = ValueAutograd::apply(args...);
    return to_tuple<Out>(r, std::make_index_sequence<std::tuple_size_v<Out>>{});
  }
};

// The C++ signatures of the ops' schemas (tldr_fast/ops/<op>.py; a mismatch fails at load time).
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using OptTensor = std::optional<Tensor>;

constexpr char kHeadLoss[] = "tldr_fast::head_loss";
constexpr char kFeatureLoss[] = "tldr_fast::feature_loss";
constexpr char kImagePrior[] = "tldr_fast::image_prior";
constexpr char kBnStats[] = "tldr_fast::bn_stats";
constexpr char kBnStatsBackward[] = "tldr_fast::bn_stats_backward";
constexpr char kModeSeek[] = "tldr_fast::mode_seek";
constexpr char kModeSeekBackward[] = "tldr_fast::mode_seek_backward";
constexpr char kColourLine[] = "tldr_fast::colour_line";
constexpr char kColourLineBackward[] = "tldr_fast::colour_line_backward";

}  // namespace

// op: its kind, signature, and for a loss op the weights' argument, then the arguments of its saved gradients
TORCH_LIBRARY_IMPL(tldr_fast, Autograd, m) {
  m.impl("head_loss", &LossAutograd<kHeadLoss, Tensor4(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                       const Tensor&, bool),
                                    4, 0, 3>::call);
  m.impl("feature_loss",
         &LossAutograd<kFeatureLoss, Tensor3(const Tensor&, const Tensor&, const OptTensor&, int64_t), 1, 0>::call);
  m.impl("image_prior",
         &LossAutograd<kImagePrior, Tensor3(const Tensor&, const Tensor&, double, double, const OptTensor&), 1, 0>::call);
  m.impl("bn_stats",
         &ValueAutograd<kBnStats, kBnStatsBackward, Tensor3(const Tensor&, const Tensor&, const Tensor&)>::call);
  m.impl("mode_seek", &ValueAutograd<kModeSeek, kModeSeekBackward, Tensor2(const Tensor&, const Tensor&)>::call);
  m.impl("colour_line", &ValueAutograd<kColourLine, kColourLineBackward, Tensor2(const Tensor&)>::call);
}

}  // namespace tldr_fast
