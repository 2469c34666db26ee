"""Characterize every registered router on the same hidden states (the router-architectures report's table):
parameter count, forward latency, mean router entropy, mean probability mass selected, experts per token, load CV."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from moe_models.analytics import routing_sums, summarize
from moe_models.routers import ROUTERS, RouterContext


@dataclass
class RouterProfile:
    router: str
    hidden_states: str  # "random", or the trained cell whose hidden states were routed
    parameters: int
    latency_ms: float  # median forward time
    entropy: float  # mean per-token router entropy (nats)
    mean_topk_prob: float  # mean probability mass of the selected experts
    experts_per_token: float
    load_cv: float

    def as_dict(self) -> dict:
        return asdict(self)


def profile_router(name: str, x_TD: torch.Tensor, token_ids_T: torch.Tensor, domain_ids_T: torch.Tensor,
                   num_experts: int, vocab_size: int, repeats: int = 20, source: str = "random") -> RouterProfile:
    torch.manual_seed(0)
    cls = ROUTERS.get(name)
    ctx = RouterContext(x_TD.shape[1], num_experts, vocab_size, 0, 0, num_domains=int(domain_ids_T.max()) + 1)
    router = cls(ctx, cls.Options()).eval()
    args = (x_TD, token_ids_T, domain_ids_T) if cls.needs_domains else (x_TD, token_ids_T)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            began = time.perf_counter()
            decision = router(*args)
            times.append((time.perf_counter() - began) * 1e3)
    stats = summarize(routing_sums(decision, decision.active_TK))
    return RouterProfile(name, source, sum(p.numel() for p in router.parameters()), statistics.median(times[2:]),
                         stats["router_entropy"], stats["mean_topk_prob"], stats["experts_per_token"],
                         stats["load_cv"])


def profile_all(tokens: int = 4096, d_model: int = 256, num_experts: int = 8, vocab_size: int = 1024,
                num_domains: int = 3, seed: int = 0) -> list[RouterProfile]:
    """On random hidden states; pass a trained model's states through `profile_router` for the 'real' column."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen)
    ids = torch.randint(vocab_size, (tokens,), generator=gen)
    dom = torch.randint(num_domains, (tokens,), generator=gen)
    return profile_states(x, ids, dom, num_experts, vocab_size, "random")


def profile_states(x_TD: torch.Tensor, token_ids_T: torch.Tensor, domain_ids_T: torch.Tensor, num_experts: int,
                   vocab_size: int, source: str) -> list[RouterProfile]:
    """Every registered router, freshly initialized, on the same hidden states (e.g. a trained model's)."""
    return [profile_router(n, x_TD, token_ids_T, domain_ids_T, num_experts, vocab_size, source=source)
            for n in ROUTERS.names()]
