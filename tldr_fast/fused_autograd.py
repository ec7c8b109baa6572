"""The autograd rule shared by the Triton fused loss ops (the extension's ops have the same rule in C++,
``csrc/autograd.cpp``).

A fused loss op returns ``(loss, terms, grad_<x>...)``: its kernels compute ``d loss / d x`` (already
weighted) in the forward pass. So ``d loss / d x`` is the saved gradient and ``d loss / d weights`` is
``terms``, each scaled by the upstream gradient of ``loss``; ``terms`` and the gradients are outputs
without a gradient of their own.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

Tensor = torch.Tensor


def fused_autograd(grad_inputs: Tuple[int, ...], weights_index: int) -> Tuple[Callable, Callable]:
    """``(setup_context, backward)`` for ``torch.library.register_autograd`` of a fused loss op whose
    outputs 2, 3, ... are the gradients of the inputs at positions ``grad_inputs`` (an input that is
    None, e.g. optional features, gets None) and whose input ``weights_index`` is the weights."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
        ctx.n_inputs = len(inputs)
        ctx.present = tuple(inputs[i] is not None for i in grad_inputs)
        ctx.weights_dtype = inputs[weights_index].dtype
        ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, *_):
        terms, *grads = ctx.saved_tensors
        out: List[Optional[Tensor]] = [None] * ctx.n_inputs
        if grad_loss is None:  # the loss does not reach the output being differentiated
            return tuple(out)
        for i, g, present in zip(grad_inputs, grads, ctx.present):
            if present and ctx.needs_input_grad[i]:
                out[i] = grad_loss * g
        if ctx.needs_input_grad[weights_index]:
            out[weights_index] = (grad_loss * terms).to(ctx.weights_dtype)
        return tuple(out)

    return setup_context, backward
