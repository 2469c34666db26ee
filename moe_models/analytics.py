"""Routing analytics as additive sums, so they accumulate over eval batches and all-reduce across ranks.

`routing_sums` turns one layer's decision into sums; `summarize` turns accumulated sums into metrics.
Definitions: ../shared/reference/routing_methods.md section 3.
"""
from __future__ import annotations

import math

import torch

from moe_models.routing import RoutingDecision

# Keys of `summarize` that are lists or matrices (logged as artifacts, not metrics).
NON_SCALAR = ("expert_fraction", "experts_per_token_hist", "coactivation", "domain_expert_share")


def primary_expert_T(decision: RoutingDecision) -> torch.Tensor:
    """Each token's highest-weight selected expert (its top-1), for purity and domain statistics."""
    weights_TK = decision.weights_TK.detach().masked_fill(~decision.active_TK, -1.0)
    return decision.expert_ids_TK.gather(1, weights_TK.argmax(-1, keepdim=True)).squeeze(-1)


def routing_sums(decision: RoutingDecision, kept_TK: torch.Tensor, domain_ids_T: torch.Tensor | None = None,
                 num_domains: int = 0) -> dict[str, torch.Tensor]:
    probs_TE = decision.probs_TE.detach().float()
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(dim=-1)
    selected_mass_T = (probs_TE.gather(1, decision.expert_ids_TK) * decision.active_TK).sum(dim=-1)
    mask_TE = decision.expert_mask_TE()
    E = decision.num_experts
    active_T, kept_T = decision.active_TK.sum(-1), kept_TK.sum(-1)
    gate_TK = decision.weights_TK.detach().float() * decision.active_TK
    sums = {
        "tokens": torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device),
        "routes_E": mask_TE.sum(dim=0),
        "kept_routes": kept_TK.sum().float(),
        "entropy": entropy_T.sum(),
        "topk_prob": selected_mass_T.sum(),
        "experts_hist": torch.bincount(active_T, minlength=E + 1)[:E + 1].float(),  # tokens with n experts
        "coactivation_EE": mask_TE.t() @ mask_TE,  # tokens routed to both i and j (diagonal: to i)
        "tokens_lost_a_route": ((kept_T < active_T)).sum().float(),
        "tokens_lost_all_routes": ((kept_T == 0) & (active_T > 0)).sum().float(),
        "gate_mass": gate_TK.sum(),
        "gate_mass_dropped": (gate_TK * ~kept_TK).sum(),
    }
    if num_domains > 0 and domain_ids_T is not None:
        labelled = domain_ids_T >= 0
        pair = domain_ids_T[labelled] * E + primary_expert_T(decision)[labelled]
        sums["domain_expert_DE"] = torch.bincount(pair, minlength=num_domains * E).view(num_domains, E).float()
    return sums


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
        # Spread of experts per token across tokens: 0 for fixed-k routers; how much a dynamic router adapts.
        "experts_per_token_std": _hist_std(sums["experts_hist"].double() / tokens),
        "router_entropy": float(sums["entropy"]) / tokens,
        # Normalized by log E so 1 = uniform router, comparable across expert counts.
        "router_entropy_norm": float(sums["entropy"]) / tokens / math.log(num_experts) if num_experts > 1 else 0.0,
        "mean_topk_prob": float(sums["topk_prob"]) / tokens,
        "drop_fraction": 1.0 - float(sums["kept_routes"]) / total_routes,
        # Utilization U = sum_i min(f_i, 1/E): 1 when balanced, 1/E when collapsed (routing testbed, Falke et al.).
        "utilization": float(fraction_E.clamp(max=1.0 / num_experts).sum()),
        "dead_experts": float((routes_E == 0).sum()),
        "load_entropy_norm": _entropy(fraction_E) / math.log(num_experts) if num_experts > 1 else 0.0,
        # Dropped routes (capacity): tokens losing at least one route, losing all, and the gate mass removed.
        "tokens_lost_a_route": float(sums["tokens_lost_a_route"]) / tokens,
        "tokens_lost_all_routes": float(sums["tokens_lost_all_routes"]) / tokens,
        "gate_mass_dropped": float(sums["gate_mass_dropped"] / sums["gate_mass"].clamp_min(1e-12)),
        "experts_per_token_hist": (sums["experts_hist"].double() / tokens).tolist(),
        # Active expert FLOPs per token in this layer (served routes x 4*D*F), where the MoE layer counted them.
        **({"expert_flops_per_token": float(sums["expert_flops"]) / tokens} if "expert_flops" in sums else {}),
        "coactivation": coactivation(sums["coactivation_EE"]).tolist(),
        **(specialization(sums["domain_expert_DE"]) if "domain_expert_DE" in sums else {}),
        # N_e(D) / N(D): the share of each domain's tokens whose top-1 expert is e (OLMoE domain specialization).
        **({"domain_expert_share": (sums["domain_expert_DE"].double()
                                    / sums["domain_expert_DE"].sum(1, keepdim=True).double().clamp_min(1)).tolist()}
           if "domain_expert_DE" in sums else {}),
    }


def _hist_std(share_N: torch.Tensor) -> float:
    """Standard deviation of n under the distribution share_N[n] (the experts-per-token histogram)."""
    n = torch.arange(share_N.numel(), dtype=torch.float64)
    mean = float((n * share_N).sum())
    return math.sqrt(max(0.0, float((n * n * share_N).sum()) - mean * mean))


def coactivation(counts_EE: torch.Tensor) -> torch.Tensor:
    """C[i, j] = N_ij / N_i: of the tokens routed to expert i, the share also routed to j (OLMoE, arXiv 2409.02060;
    counted over all selected experts, not only adjacent ranks)."""
    counts = counts_EE.double()
    return counts / counts.diagonal().clamp_min(1.0).unsqueeze(1)


def difficulty_sums(experts_per_token_T: torch.Tensor, token_nll_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive sums for the Pearson correlation between experts per token and token loss (input difficulty)."""
    x, y = experts_per_token_T.double(), token_nll_T.double()
    return {"n": x.new_tensor(float(len(x)), dtype=torch.float64), "x": x.sum(), "y": y.sum(), "xx": (x * x).sum(),
            "yy": (y * y).sum(), "xy": (x * y).sum()}


def pearson(s: dict[str, torch.Tensor]) -> float:
    """NaN when experts per token is constant (fixed-k routers): there is nothing to correlate."""
    n = float(s["n"])
    cov = float(s["xy"]) / n - float(s["x"]) * float(s["y"]) / n**2
    var_x = float(s["xx"]) / n - (float(s["x"]) / n) ** 2
    var_y = float(s["yy"]) / n - (float(s["y"]) / n) ** 2
    if var_x <= 1e-12 or var_y <= 1e-12:
        return float("nan")
    return cov / math.sqrt(var_x * var_y)


def saturation(snapshot_TE: torch.Tensor, final_TE: torch.Tensor) -> float:
    """Router saturation (OLMoE): mean over tokens of |S_t(snapshot) & S_t(final)| / |S_t(final)| on the same
    evaluation tokens; 1 = the router already routes as it will at the end of training."""
    overlap_T = (snapshot_TE & final_TE).sum(-1).double()
    return float((overlap_T / final_TE.sum(-1).clamp_min(1)).mean())


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def specialization(counts_DE: torch.Tensor) -> dict[str, float]:
    """Purity = (1/T) sum_e max_d n_{e,d} (top-1 routes), and NMI = I(D;E) / sqrt(H(D) H(E)) between the document
    domain and the token's top-1 expert (routing_methods.md section 3)."""
    counts = counts_DE.double()
    total = float(counts.sum())
    if total == 0:
        return {}
    joint = counts / total
    h_d, h_e, h_de = _entropy(joint.sum(1)), _entropy(joint.sum(0)), _entropy(joint.flatten())
    mutual = h_d + h_e - h_de
    # Agreement with a reference router (one expert per domain) up to a permutation of expert ids: the best
    # one-to-one domain -> expert matching (Hungarian) and the share of tokens it explains.
    from scipy.optimize import linear_sum_assignment  # 0.5 s to import: only where agreement is scored

    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    return {"purity": float(counts.max(dim=0).values.sum()) / total,
            "domain_expert_nmi": mutual / math.sqrt(h_d * h_e) if h_d > 0 and h_e > 0 else 0.0,
            "reference_agreement": float(counts.numpy()[rows, cols].sum()) / total}
