"""What the spline kernels' custom ops (C++ CPU, Triton) share: fake implementations, so torch.compile traces
them, and the autograd formula that routes a forward op's gradient through its backward op."""
import torch


def register_spline_ops(forward: torch.library.CustomOpDef, backward: torch.library.CustomOpDef) -> None:
    """forward(x, values, x_min, x_max) -> y and backward(grad, x, values, x_min, x_max, values_grad) ->
    (grad_x, grad_values, empty when values_grad is False): fakes for both, and forward's autograd by backward."""

    @forward.register_fake
    def _(x, values, x_min, x_max):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @backward.register_fake
    def _(grad, x, values, x_min, x_max, values_grad):
        grad_v = torch.empty_like(values) if values_grad else values.new_empty(0)
        return torch.empty_like(x, memory_format=torch.contiguous_format), grad_v

    def setup_context(ctx, inputs, output):
        x, values, x_min, x_max = inputs
        ctx.save_for_backward(x, values)
        ctx.x_range = (x_min, x_max)

    def gradients(ctx, grad):
        x, values = ctx.saved_tensors
        grad_x, grad_v = backward(grad, x, values, *ctx.x_range, ctx.needs_input_grad[1])
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_v if ctx.needs_input_grad[1] else None, None, None)

    forward.register_autograd(gradients, setup_context=setup_context)
