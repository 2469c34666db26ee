"""What a causal-LM checkpoint is, read from its config alone (config.json: no weights, no torch): dense or MoE,
how many layers and experts, which layers are MoE. The study validator and the model builder both ask here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# MoE model types whose blocks router swap knows; their routed-expert count is under one of these config keys
# (transformers' names, which some configs alias: Qwen3-MoE writes num_local_experts).
# DeepSeek-V3 and GLM-4-MoE share one block: sigmoid scores with a selection-only correction bias, group-limited
# top-k, a routed scaling factor and ungated shared experts, after first_k_dense_replace dense layers.
# GPT-OSS: a router with a logit bias (softmax over the top-k logits) and clamped-SwiGLU experts with biases.
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# Dense decoders whose MLP upcycling knows: GPT-2's (c_fc, c_proj; GELU) and the gated one (gate/up/down; SiLU).
DENSE_MLPS = {"gpt2": "gpt2", "llama": "gated", "qwen2": "gated", "mistral": "gated", "qwen3": "gated"}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    num_experts: int  # routed experts per MoE layer; 0 for a dense checkpoint
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is an MoE block
    experts_per_token: int = 0
    norm_topk_prob: bool = False  # does the checkpoint's router renormalize its top-k weights?

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mlp_returns_pair(self) -> bool:
        """GPT-OSS's decoder layer unpacks `hidden_states, router_scores = self.mlp(...)`."""
        return self.model_type == "gpt_oss"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Architecture":
        model_type = config.get("model_type", "?")
        layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
        hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
        positions = config.get("max_position_embeddings") or config.get("n_positions")
        common = dict(model_type=model_type, num_layers=layers, hidden_size=hidden,
                      vocab_size=int(config.get("vocab_size", 0)), max_positions=positions)
        if model_type in MOE_TYPES:
            count = next((config[k] for k in EXPERT_COUNT_KEYS if config.get(k)), None)
            if not count:
                raise ValueError(f"{model_type} config without an expert count ({' or '.join(EXPERT_COUNT_KEYS)})")
            return cls(**common, num_experts=int(count),
                       moe_layers=_moe_layers(model_type, config, layers),
                       experts_per_token=int(config.get("num_experts_per_tok", 0)),
                       norm_topk_prob=model_type in ("mixtral", "gpt_oss") or bool(config.get("norm_topk_prob", False)))
        if model_type in DENSE_MLPS:
            return cls(**common, num_experts=0, moe_layers=())
        raise ValueError(f"model_type {model_type!r} is neither an MoE moelab can swap routers in "
                         f"({', '.join(MOE_TYPES)}) nor a dense decoder it can upcycle ({', '.join(DENSE_MLPS)})")


def _moe_layers(model_type: str, config: dict[str, Any], layers: int) -> tuple[int, ...]:
    """Qwen-MoE checkpoints may keep dense MLPs in some layers (mlp_only_layers, decoder_sparse_step); DeepSeek-V3's
    first first_k_dense_replace layers are dense."""
    if model_type in ("deepseek_v3", "glm4_moe"):
        return tuple(range(int(config.get("first_k_dense_replace") or 0), layers))
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return tuple(range(layers))
    dense, step = set(config.get("mlp_only_layers") or []), int(config.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
