"""The opt-in routing trace of a cell's final evaluation (`training.routing_trace_tokens: N`): one row per (token,
MoE block) for the first N evaluation tokens of rank 0, with the experts the token went to and their gate weights,
saved as `eval/routing_trace.parquet` on the cell's MLflow run (Megatron-Core's router_trace, as a table). Its size
is bounded by N x MoE blocks rows. LM cells only: an encoder-decoder's blocks route two different token streams.

Reading it: `pandas.read_parquet(mlflow.artifacts.download_artifacts(run_id=..., artifact_path=TRACE_ARTIFACT))`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_models.moe_ffn import MoEAux

TRACE_ARTIFACT = "eval/routing_trace.parquet"
COLUMNS = ("sequence", "position", "token_id", "domain", "layer", "experts", "weights")


@dataclass
class RoutingTrace:
    limit: int  # tokens to trace
    columns: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    tokens: int = 0  # traced so far
    sequences: int = 0  # evaluation sequences seen so far (the `sequence` of the next batch's first row)

    @property
    def full(self) -> bool:
        return self.tokens >= self.limit

    def add(self, inputs: tuple[torch.Tensor, ...], moe: dict[int, MoEAux]) -> None:
        """One evaluation forward of a decoder LM: `inputs` (input ids, targets[, domain ids]) and its MoE records."""
        ids_BS = inputs[0]
        B, S = ids_BS.shape
        take = min(self.limit - self.tokens, B * S)
        if take <= 0:
            return
        token_ids = ids_BS.reshape(-1)[:take].tolist()
        positions = torch.arange(S).repeat(B)[:take].tolist()
        sequences = (torch.arange(B).repeat_interleave(S) + self.sequences)[:take].tolist()
        domain_BS = inputs[2] if len(inputs) > 2 else None
        domains = domain_BS.reshape(-1)[:take].tolist() if domain_BS is not None else [None] * take
        for layer, aux in sorted(moe.items()):
            decision = aux.decision  # one copy to the host per block, then plain lists (no per-token tensor ops)
            ids, weights = decision.expert_ids_TK[:take].tolist(), decision.weights_TK[:take].float().tolist()
            active = decision.active_TK[:take].tolist()
            for ids_K, weights_K, active_K in zip(ids, weights, active):
                self.columns["experts"].append([e for e, a in zip(ids_K, active_K) if a])
                self.columns["weights"].append([w for w, a in zip(weights_K, active_K) if a])
            self.columns["layer"] += [layer] * take
            self.columns["sequence"] += sequences
            self.columns["position"] += positions
            self.columns["token_id"] += token_ids
            self.columns["domain"] += domains
        self.tokens += take
        self.sequences += B

    def write(self, path: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"sequence": pa.int32(), "position": pa.int32(), "token_id": pa.int32(), "domain": pa.int16(),
                 "layer": pa.int16(), "experts": pa.list_(pa.int16()), "weights": pa.list_(pa.float32())}
        table = pa.table({name: pa.array(self.columns[name], type=types[name]) for name in COLUMNS})
        pq.write_table(table, path)
        return path
