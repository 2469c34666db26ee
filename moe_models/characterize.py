"""Characterize every registered router, and the routing of today's open models, on the same hidden states (the
router-architectures report's table): parameter count, forward latency, mean router entropy, mean probability mass
selected, experts per token, load CV; and what a router costs a model that serves it: milliseconds per generated
token of a small GPT-MoE decoding with a key/value cache (models/kv_cache.py), each router in the same model."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from moe_models.analytics import routing_sums, summarize
from moe_models.routers import ROUTERS, RouterContext


@dataclass
class RouterProfile:
    router: str
    hidden_states: str  # "random", or the trained cell / pretrained encoder whose hidden states were routed
    seed: int  # the router's initialization
    parameters: int
    latency_ms: float  # median forward time, timed round-robin with every other router (same machine noise)
    entropy: float  # mean per-token router entropy (nats)
    mean_topk_prob: float  # mean probability mass of the selected experts
    experts_per_token: float
    load_cv: float
    # a 2-block GPT-MoE with this router, greedy at batch 1; NaN for a router no decoder can serve (one that reads
    # domain labels, or a non-causal one)
    decode_ms_per_token: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


# The routing of today's open MoE models, as top-k options (moe_models/routers/topk.py), profiled beside every
# registered router under "topk:<model>". Group counts are DeepSeek-V3's ratio (8 groups of 256, 4 kept) scaled down.
MODEL_ROUTING: dict[str, dict] = {
    "deepseek_v3": {"k": 2, "score": "sigmoid", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                    "renormalize": True, "expert_bias_rate": 1e-3},
    "deepseek_v4": {"k": 2, "score": "sqrt_softplus", "routed_scaling_factor": 1.5, "renormalize": True,
                    "expert_bias_rate": 1e-3},
    "gpt_oss": {"k": 2, "router_bias": True, "renormalize": True},
    "quantile_balanced": {"k": 2, "score": "sigmoid", "quantile_balancing": True},
    "forced_uniform": {"k": 2, "force_uniform": True},
    "null_experts": {"k": 2, "null_experts": 2, "renormalize": True},  # MoE++ (zero experts), LongCat-Flash
}


def router_cases(num_experts: int) -> dict[str, tuple[str, dict]]:
    """label -> (registered router, options): every router with its defaults, then MODEL_ROUTING where it fits."""
    from moe_models.routers.options import TopKOptions

    cases = {name: (name, {}) for name in ROUTERS.names()}
    for model, options in MODEL_ROUTING.items():
        if not TopKOptions(**options).layer_problems(num_experts) and options["k"] < num_experts:
            cases[f"topk:{model}"] = ("topk", options)
    return cases


def _build(case: tuple[str, dict], d_model: int, num_experts: int, vocab_size: int, num_domains: int, seed: int):
    torch.manual_seed(seed)
    name, options = case
    cls = ROUTERS.get(name)
    ctx = RouterContext(d_model, num_experts, vocab_size, 0, 0, num_domains=num_domains)
    return cls(ctx, cls.Options(**options)).eval()


def profile_states(x_TD: torch.Tensor, token_ids_T: torch.Tensor, domain_ids_T: torch.Tensor, num_experts: int,
                   vocab_size: int, source: str, seeds: tuple[int, ...] = (0,),
                   repeats: int = 20, decoding: bool = True) -> list[RouterProfile]:
    """Every registered router, freshly initialized with each seed, on the same hidden states (e.g. a trained
    model's). Latency is timed round-robin: one forward of each router in turn, `repeats` rounds after 2 warm-up
    rounds, so a ratio between two routers is measured side by side. decoding: also time each router in a small
    decoder, with the first seed's initialization (a model's cost does not depend on whose hidden states the router
    table used, nor much on the seed: once per command)."""
    cases = router_cases(num_experts)
    names = list(cases)
    num_domains = int(domain_ids_T.max()) + 1
    profiles = []
    for seed in seeds:
        routers = {n: _build(cases[n], x_TD.shape[1], num_experts, vocab_size, num_domains, seed) for n in names}
        args = {n: (x_TD, token_ids_T, domain_ids_T) if r.needs_domains else (x_TD, token_ids_T)
                for n, r in routers.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        decisions = {}
        with torch.no_grad():
            for _ in range(repeats + 2):
                for n, router in routers.items():
                    began = time.perf_counter()
                    decisions[n] = router(*args[n])
                    times[n].append((time.perf_counter() - began) * 1e3)
        for n, router in routers.items():
            stats = summarize(routing_sums(decisions[n], decisions[n].active_TK))
            decode = decoder_ms_per_token(cases[n], x_TD.shape[1], num_experts, vocab_size, seed) \
                if decoding and seed == seeds[0] else math.nan  # a model's decode step varies little by seed
            profiles.append(RouterProfile(n, source, seed, sum(p.numel() for p in router.parameters()),
                                          statistics.median(times[n][2:]), stats["router_entropy"],
                                          stats["mean_topk_prob"], stats["experts_per_token"], stats["load_cv"],
                                          decode))
    return profiles


POOLED = ("latency_ms", "entropy", "mean_topk_prob", "experts_per_token", "load_cv", "decode_ms_per_token")


def decoder_ms_per_token(case: tuple[str, dict], d_model: int, num_experts: int, vocab_size: int,
                         seed: int) -> float:
    """ms per generated token of a small GPT-MoE (2 blocks, this router in both, experts 2 x d_model wide)."""
    from moe_models.models import MODELS
    from moe_models.models.kv_cache import NEW_TOKENS, PROMPT_TOKENS, decode_ms_per_token
    from moe_models.spec import RoutingSpec

    name, options = case
    cls = ROUTERS.get(name)
    if cls.needs_domains or not cls.causal:
        return math.nan
    gpt = MODELS.get("gpt")
    torch.manual_seed(seed)
    model = gpt.build(gpt.Options(d_model=d_model, n_layers=2, n_heads=4, num_experts=num_experts,
                                  expert_hidden=2 * d_model), RoutingSpec(name, cls.Options(**options)), vocab_size,
                      PROMPT_TOKENS + NEW_TOKENS, seed).eval()
    prompt = torch.randint(vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    return decode_ms_per_token(model, prompt, model.new_decoding_state, NEW_TOKENS, torch.device("cpu"))


def pool_profiles(profiles: list[RouterProfile], reference: str = "topk") -> list[dict]:
    """Per router and hidden states, over seeds: the mean of each measure with its 95% t-interval half-width
    (`<measure>_ci`, None under 2 seeds) and latency relative to the linear router's (`reference`) of the same
    seeds, as the mean of per-seed ratios."""
    from moe_eval.bootstrap import t_interval

    groups: dict[tuple[str, str], list[RouterProfile]] = {}
    for p in profiles:
        groups.setdefault((p.hidden_states, p.router), []).append(p)
    rows = []
    for (source, router), group in groups.items():
        row: dict = {"router": router, "hidden_states": source, "seeds": len(group), "parameters": group[0].parameters}
        for measure in POOLED:
            values = [v for p in group if not math.isnan(v := getattr(p, measure))]
            if not values:  # not measured for this router (a decoder cannot serve it): None, not NaN, in JSON too
                row[measure], row[f"{measure}_ci"] = None, None
                continue
            mean, half_width = t_interval(values)
            row[measure], row[f"{measure}_ci"] = mean, None if math.isnan(half_width) else half_width
        linear = {p.seed: p.latency_ms for p in groups.get((source, reference), [])}
        ratios = [p.latency_ms / linear[p.seed] for p in group if p.seed in linear]
        row["latency_vs_linear"] = statistics.fmean(ratios) if ratios else None
        rows.append(row)
    return rows


def profile_all(tokens: int = 4096, d_model: int = 256, num_experts: int = 8, vocab_size: int = 1024,
                num_domains: int = 3, seed: int = 0, seeds: tuple[int, ...] = (0,)) -> list[RouterProfile]:
    """On random hidden states; pass real ones (a trained cell's, a pretrained encoder's) to `profile_states`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen)
    ids = torch.randint(vocab_size, (tokens,), generator=gen)
    dom = torch.randint(num_domains, (tokens,), generator=gen)
    return profile_states(x, ids, dom, num_experts, vocab_size, "random", seeds)
