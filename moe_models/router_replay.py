"""Router replay (Megatron-Core's router_replay.py; transformers' MoERouting): record which experts each token of each
forward chose, per MoE block, then force those choices in another run while the gates stay live, so the replayed
run's gate weights and their gradients come from its own router. Used for RL (the policy update routes as the
rollout did) and as a control for a router swap (a new router's gates over the old router's routes).

A top-k router (and every router that subclasses it) records and replays through `TopKRouter.select`; routers whose
selection is not a top-k (top-p, hash, expert choice) do not take part.

    replay = RouterReplay.recording()
    attach(model, replay); model(batch)                     # records, forward by forward
    replay.save(path)
    attach(other_model, RouterReplay.replaying(path)); other_model(batch)   # routes as recorded
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn


@dataclass
class RouterReplay:
    mode: Literal["record", "replay"]
    # block index -> each forward's (T, k) expert ids, in order
    choices: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _next: dict[int, int] = field(default_factory=dict)

    @classmethod
    def recording(cls) -> "RouterReplay":
        return cls("record")

    @classmethod
    def replaying(cls, source: Path | str | "RouterReplay") -> "RouterReplay":
        choices = source.choices if isinstance(source, RouterReplay) else torch.load(source, weights_only=True)
        return cls("replay", {layer: list(ids) for layer, ids in choices.items()})

    def select(self, layer: int, chosen_TK: torch.Tensor) -> torch.Tensor:
        """Record this forward's choices and return them, or return the recorded ones of this forward."""
        if self.mode == "record":
            self.choices.setdefault(layer, []).append(chosen_TK.detach().cpu())
            return chosen_TK
        position = self._next.get(layer, 0)
        recorded = self.choices.get(layer, [])
        if position >= len(recorded):
            raise IndexError(f"router replay: block {layer} has {len(recorded)} recorded forwards; forward "
                             f"{position + 1} asked for one more")
        if recorded[position].shape != chosen_TK.shape:
            raise ValueError(f"router replay: block {layer} forward {position + 1} routes {tuple(chosen_TK.shape)} "
                             f"(tokens, k); the recording has {tuple(recorded[position].shape)}")
        self._next[layer] = position + 1
        return recorded[position].to(chosen_TK.device)

    def save(self, path: Path | str) -> None:
        torch.save(self.choices, path)


def attach(model: nn.Module, replay: RouterReplay | None) -> int:
    """Give every top-k router of `model` this replay (None detaches); returns how many routers took it."""
    from moe_models.routers.topk import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.replay = replay
    return len(routers)
