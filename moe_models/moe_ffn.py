"""The MoE feed-forward block: `x -> y`, like the dense FFN it replaces.

Flow:
  1. the router turns hidden states (and the token ids the model fed its MoERecorder) into a RoutingDecision;
  2. balancing losses (registry) are computed from the decision over the layer's BalanceScope and scaled by their
     study-file coefficients;
  3. the dispatch backend sends tokens to experts and combines their outputs with the decision's weights;
  4. the layer records its MoEAux (losses; in evaluation, additive routing sums for analytics) in the recorder,
     which the model reads after its forward (OLMo-core's pattern: layers record, the loop reads).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from moe_models.analytics import routing_sums
from moe_models.balancing import BALANCING_LOSSES
from moe_models.balancing.base import BalanceScope
from moe_models.fp32_state import Fp32Buffers
from moe_models.routers import Router
from moe_models.routing import RoutingDecision


@dataclass
class MoEAux:
    loss: torch.Tensor  # sum of scaled balancing + router losses, added to the LM loss
    unscaled: dict[str, torch.Tensor] = field(default_factory=dict)  # per-method loss before its coefficient
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # analytics.routing_sums (evaluation only)
    expert_mask_TE: torch.Tensor | None = None  # bool, each token's selected experts (evaluation only)
    decision: RoutingDecision | None = None  # the real tokens' routing, detached (evaluation only: the trace)


@dataclass(frozen=True)
class TokenInputs:
    """What routing needs of a forward pass beyond hidden states: token ids (hash routers), domain labels (the
    reference router), and which tokens are real (padding is routed, so shapes stay static, but left out of
    analytics)."""

    token_ids_BS: torch.Tensor
    domain_ids_BS: torch.Tensor | None = None
    valid_BS: torch.Tensor | None = None


class MoERecorder:
    """Shared by a model's MoE layers. The model feeds it each forward's TokenInputs; every layer reads them and
    records its MoEAux under its layer index; the model takes the records after the forward."""

    def __init__(self):
        self.inputs: TokenInputs | None = None
        self._aux: dict[int, MoEAux] = {}

    def begin(self, token_ids_BS: torch.Tensor, domain_ids_BS: torch.Tensor | None = None,
              valid_BS: torch.Tensor | None = None) -> None:
        """A new forward pass: these inputs, no records yet."""
        self.reset()
        self.feed(token_ids_BS, domain_ids_BS, valid_BS)

    def reset(self) -> None:
        self._aux = {}

    def feed(self, token_ids_BS: torch.Tensor, domain_ids_BS: torch.Tensor | None = None,
             valid_BS: torch.Tensor | None = None) -> None:
        """Other inputs within the same forward (an encoder-decoder's decoder), records kept."""
        self.inputs = TokenInputs(token_ids_BS, domain_ids_BS, valid_BS)

    def record(self, layer_index: int, aux: MoEAux) -> None:
        self._aux[layer_index] = aux

    def take(self) -> dict[int, MoEAux]:
        """This forward's records by layer index, in order; the recorder is left empty."""
        aux, self._aux = dict(sorted(self._aux.items())), {}
        return aux


def share_recorder(model: nn.Module) -> MoERecorder:
    """One recorder for every MoE layer of `model` (a plain attribute, not a submodule: no state, no parameters)."""
    recorder = MoERecorder()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.recorder = recorder
    return recorder


class MoEFeedForward(Fp32Buffers):
    fp32_buffers = ("window_routes_E",)  # an accumulator (fp32_state.py)

    def __init__(self, router: Router, dispatch: nn.Module, balancing: dict[str, float],
                 balancing_scope: str = "micro_batch", shared_experts: nn.Module | None = None,
                 shared_expert_gate: bool = False, latent: tuple[int, int] | None = None):
        super().__init__()
        self.router = router
        self.dispatch = dispatch
        # Latent MoE (model width, expert width): the routed experts see a shared down-projection of the token and
        # their output is projected back up (Nemotron 3). Outside `dispatch`, so FLOPs count them as linears.
        self.latent_down = nn.Linear(*latent, bias=False) if latent else None
        self.latent_up = nn.Linear(*reversed(latent), bias=False) if latent else None
        # Always-on experts added to the routed output (DeepSeekMoE, Qwen-MoE); with a gate, each token scales theirs
        # by sigmoid(w . x) (Qwen2-MoE's shared_expert_gate). Routing and its metrics never see them.
        self.shared_experts = shared_experts
        self.shared_expert_gate = nn.Linear(router.ctx.d_model, 1, bias=False) if shared_expert_gate else None
        self.balancing = {name: (BALANCING_LOSSES.get(name), coef) for name, coef in balancing.items()}
        self.balancing_scope = balancing_scope
        self.analytics = True  # evaluation analytics; decoding turns them off (see routing_analytics_off)
        # global_batch scope: route counts of every rank and micro-batch since the last optimizer step.
        self.register_buffer("window_routes_E", torch.zeros(router.ctx.num_experts), persistent=False)
        self.recorder = MoERecorder()  # its own until the model shares one (share_recorder)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        inputs = self.recorder.inputs
        if inputs is None:
            raise RuntimeError("an MoE layer ran before its model fed the MoERecorder its token inputs")
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        domain_ids_T = None if inputs.domain_ids_BS is None else inputs.domain_ids_BS.reshape(-1)
        if self.router.needs_domains:
            if domain_ids_T is None or (domain_ids_T < 0).any():
                raise ValueError(f"router {type(self.router).__name__} routes by domain label, but the batch has "
                                 "unlabelled tokens; use a dataset with domain labels (e.g. builtin:domains)")
            decision = self.router(x_TD, inputs.token_ids_BS.reshape(-1), domain_ids_T)
        else:
            decision = self.router(x_TD, inputs.token_ids_BS.reshape(-1))
        scope = self._scope(decision, x_BSD.shape[1])
        unscaled = {name: fn(decision, scope) for name, (fn, _) in self.balancing.items()}
        loss = sum((coef * unscaled[name] for name, (_, coef) in self.balancing.items()), x_TD.new_zeros(()).float())
        loss = loss + sum(decision.router_losses.values(), x_TD.new_zeros(()).float())
        dense_gradient = self.training and getattr(self.router.options, "dense_gradient", False)
        experts_in_TD = x_TD if self.latent_down is None else self.latent_down(x_TD)
        # DenseMixer: the router learns from the dense mixture only, so the sparse output's weights are constants.
        out = self.dispatch(experts_in_TD, replace(decision, weights_TK=decision.weights_TK.detach())
                            if dense_gradient else decision)
        routed_TD = out.y_TD
        if dense_gradient:
            routed_TD = routed_TD + self._dense_router_gradient(experts_in_TD, decision.probs_TE).to(routed_TD.dtype)
        y_TD = (routed_TD if self.latent_up is None else self.latent_up(routed_TD)).reshape_as(x_TD)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        aux = MoEAux(loss, {k: v.detach() for k, v in unscaled.items()})
        if not self.training and self.analytics:  # an evaluation product: no per-step cost in training or decoding
            self._add_analytics(aux, decision, out.kept_TK, domain_ids_T, inputs.valid_BS)
        self.recorder.record(self.router.ctx.layer_index, aux)
        return y_TD.view_as(x_BSD)

    def _dense_router_gradient(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        """Zero in the forward; in the backward, the gradient of sum_e p_e * E_e(x) with respect to the gates p, the
        experts' outputs held constant (DenseMixer). Every expert's output comes through this layer's own dispatch,
        one expert at a time with weight 1, so any backend and expert parallelism compute it."""
        T, E = probs_TE.shape
        with torch.no_grad():
            ones_T1 = torch.ones(T, 1, dtype=torch.float32, device=x_TD.device)
            outputs_ETD = torch.stack([self.dispatch(x_TD, RoutingDecision(
                torch.full((T, 1), e, dtype=torch.long, device=x_TD.device), ones_T1, ones_T1.bool(),
                probs_TE.detach(), all_active=True)).y_TD for e in range(E)])
        dense_TD = torch.einsum("te,etd->td", probs_TE, outputs_ETD.float())
        return dense_TD - dense_TD.detach()

    def _scope(self, decision: RoutingDecision, sequence_length: int) -> BalanceScope:
        window_E = None
        if self.balancing_scope == "global_batch" and self.training and self.balancing:
            window_E = self._accumulate_window(decision.routes_per_expert_E().detach())
        return BalanceScope(self.balancing_scope, sequence_length, window_E)

    def _add_analytics(self, aux: MoEAux, decision: RoutingDecision, kept_TK: torch.Tensor,
                       domain_ids_T: torch.Tensor | None, valid_BS: torch.Tensor | None) -> None:
        if valid_BS is not None:
            valid_T = valid_BS.reshape(-1)
            decision, kept_TK = decision.rows(valid_T), kept_TK[valid_T]
            domain_ids_T = None if domain_ids_T is None else domain_ids_T[valid_T]
        aux.sums = routing_sums(decision, kept_TK, domain_ids_T, self.router.ctx.num_domains)
        # Routed experts only: served routes x FLOPs per route (shared experts count with the dense linears).
        aux.sums["expert_flops"] = kept_TK.sum().float() * self.dispatch.spec.flops_per_route
        aux.expert_mask_TE = decision.expert_mask_TE().bool()
        aux.decision = decision

    def _accumulate_window(self, routes_E: torch.Tensor) -> torch.Tensor:
        routes_E = routes_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(routes_E)  # every data-parallel rank's tokens
        self.window_routes_E += routes_E
        return self.window_routes_E.clone()

    def after_optimizer_step(self) -> None:
        self.window_routes_E.zero_()


def moe_forward(layer: MoEFeedForward, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor,
                domain_ids_BS: torch.Tensor | None = None,
                valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
    """A lone MoE layer, outside a model (tests, benchmarks): its output and what it recorded."""
    layer.recorder.begin(token_ids_BS, domain_ids_BS, valid_BS)
    y = layer(x_BSD)
    return y, layer.recorder.take()[layer.router.ctx.layer_index]


@contextmanager
def routing_analytics_off(model: nn.Module) -> Iterator[None]:
    """Decoding runs the model in eval mode once per generated token; its routing analytics would be discarded."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer in layers:
        layer.analytics = False
    try:
        yield
    finally:
        for layer in layers:
            layer.analytics = True
