"""Router interface: hidden states (+ token ids) in, one RoutingDecision out.

A router is an nn.Module with a pydantic `Options` model (validated from the study file, unknown keys rejected) and a
`forward(x_TD, token_ids_T) -> RoutingDecision`. Adding a router = its Options class in `routers/options.py`,
registered under its name, and one file `routers/<name>.py` that subclasses `Router` and registers itself in
`ROUTERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.routers.options import RouterOptions
from moe_models.routing import RoutingDecision


@dataclass(frozen=True)
class RouterContext:
    """What a router may know about the layer it sits in."""

    d_model: int
    num_experts: int
    vocab_size: int
    layer_index: int
    seed: int
    num_domains: int = 0  # domain labels the dataset carries (0 = unlabelled)
    token_counts_V: torch.Tensor | None = None  # token-id frequencies of the training split (balanced hash)


class Router(nn.Module):
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    # What the validator knows without torch (routers/options.py): whether the router reads domain labels (a third
    # argument, `domain_ids_T`), is causal, and may leave a token unrouted.
    needs_domains: ClassVar[bool] = False
    causal: ClassVar[bool] = True
    min_experts_per_token: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.needs_domains, cls.causal = cls.Options.needs_domains, cls.Options.causal
        cls.min_experts_per_token = cls.Options.min_experts_per_token

    def __init__(self, ctx: RouterContext, options: RouterOptions):
        super().__init__()
        self.ctx = ctx
        self.options = options

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:  # pragma: no cover
        raise NotImplementedError


def in_fp32(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """`module(*inputs)` computed in fp32 whatever the model's dtype, on fp32 casts of its parameters. Not
    `module.float()`: that converts the parameters in place, replacing the tensors the engine and optimizer hold (bf16
    views into ZeRO's flat buffers, say) and mutating the model inside its own forward (which torch.compile cannot
    trace). Gradients flow back through the casts, in each parameter's own dtype. Linears and Sequentials (what the
    routers are made of) are applied directly: functional_call's parameter swap costs ~25 us per call on the host."""
    inputs = tuple(x.float() for x in inputs)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.float()
        return F.linear(*inputs, module.weight.float(), bias)
    if isinstance(module, nn.Sequential):
        (x,) = inputs
        for layer in module:
            x = in_fp32(layer, x)
        return x
    params = dict(module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        return module(*inputs)
    return torch.func.functional_call(module, {name: p.float() for name, p in params.items()}, inputs)


class LinearScoreRouter(Router):
    """Shared by routers that score experts with one bias-free linear map (top-k, top-p, entropy-adaptive)."""

    def __init__(self, ctx: RouterContext, options: RouterOptions):
        super().__init__(ctx, options)
        self.proj = nn.Linear(ctx.d_model, ctx.num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Router math in fp32: bf16 logits flip top-k choices between ranks (Megatron/OLMo-core do the same).
        return F.linear(x_TD.float(), self.proj.weight.float())


