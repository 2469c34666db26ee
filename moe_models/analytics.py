"""Routing analytics as additive sums, so they accumulate over eval batches and all-reduce across ranks.

`routing_sums` turns one layer's decision into sums; `summarize` turns accumulated sums into metrics.
Definitions: ../shared/reference/routing_methods.md section 3.
"""
from __future__ import annotations

import math

import torch

from moe_models.routing import RoutingDecision

SUM_KEYS = ("tokens", "routes_E", "kept_routes", "entropy", "topk_prob")


def routing_sums(decision: RoutingDecision, kept_TK: torch.Tensor) -> dict[str, torch.Tensor]:
    probs_TE = decision.probs_TE.detach().float()
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(dim=-1)
    selected_mass_T = (probs_TE.gather(1, decision.expert_ids_TK) * decision.active_TK).sum(dim=-1)
    return {
        "tokens": torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device),
        "routes_E": decision.tokens_per_expert_E().detach().float(),
        "kept_routes": kept_TK.sum().float(),
        "entropy": entropy_T.sum(),
        "topk_prob": selected_mass_T.sum(),
    }


def add_sums(total: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if total is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: total[k] + new[k] for k in total}


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """Metrics of one layer: expert load fractions, load CV, experts/token, router entropy, drop fraction."""
    routes_E = sums["routes_E"].double()
    total_routes = float(routes_E.sum().clamp_min(1.0))
    tokens = float(sums["tokens"].clamp_min(1.0))
    fraction_E = routes_E / total_routes
    num_experts = routes_E.numel()
    mean_load = routes_E.mean()
    load_cv = float(routes_E.std(unbiased=False) / mean_load) if mean_load > 0 else 0.0
    return {
        "expert_fraction": fraction_E.tolist(),
        "load_cv": load_cv,
        "max_violation": float(routes_E.max() / mean_load - 1) if mean_load > 0 else 0.0,
        "experts_per_token": total_routes / tokens,
        "router_entropy": float(sums["entropy"]) / tokens,
        # Normalized by log E so 1 = uniform router, comparable across expert counts.
        "router_entropy_norm": float(sums["entropy"]) / tokens / math.log(num_experts) if num_experts > 1 else 0.0,
        "mean_topk_prob": float(sums["topk_prob"]) / tokens,
        "drop_fraction": 1.0 - float(sums["kept_routes"]) / total_routes,
    }
