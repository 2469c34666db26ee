"""moelab's own llama-family models in the Hugging Face format, so a finished cell can be another cell's
`pretrained: cell:<model>/<router>` source: the dense baseline becomes a LlamaForCausalLM (to upcycle), a model
whose every block is top-k MoE becomes a MixtralForCausalLM (to swap routers in). Module names already follow
transformers' (llama.py), so the export renames keys and restacks the experts; `tests/` holds the exported model's
logits to ours. Under expert parallelism each rank holds its own experts: `exported_state` gathers them over the
expert-parallel group (every rank calls it), and one rank writes the checkpoint (`write`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_models.routers.options import TopKOptions
from moe_models.spec import RoutingSpec

EXPORTABLE_FAMILIES = ("llama",)


def export_problem(family: str, opts, routing: RoutingSpec) -> str | None:
    """Why this (model, router) cannot be exported as a checkpoint, or None."""
    if family not in EXPORTABLE_FAMILIES:
        return f"a {family} model cannot be exported as a checkpoint; the llama family can"
    if routing.is_dense:
        return None
    o = routing.options
    mixtral = TopKOptions(k=o.k, renormalize=True, jitter=o.jitter) if routing.router == "topk" else None
    if o != mixtral:  # anything else routes differently from the checkpoint's router
        return ("an MoE source is exported as Mixtral, whose routing is softmax top-k, renormalized: the source's "
                "router must be {name: topk, renormalize: true} (softmax, no expert bias, no other routing option)")
    if opts.moe_every != 1 or opts.num_shared_experts:
        return "an MoE source is exported as Mixtral: every block MoE (moe_every: 1), no shared experts"
    return None


def hf_config(opts, routing: RoutingSpec, vocab_size: int, max_seq_len: int) -> dict[str, Any]:
    """The exported checkpoint's config.json (a plain dict: the study validator reads it without transformers)."""
    common = dict(vocab_size=vocab_size, hidden_size=opts.d_model, num_hidden_layers=opts.n_layers,
                  num_attention_heads=opts.n_heads, num_key_value_heads=opts.kv_heads,
                  head_dim=opts.d_model // opts.n_heads, max_position_embeddings=max_seq_len,
                  rms_norm_eps=opts.rms_norm_eps, rope_theta=opts.rope_theta, hidden_act="silu",
                  tie_word_embeddings=opts.tie_embeddings, attention_dropout=0.0)
    if routing.is_dense:
        return {"model_type": "llama", **common, "intermediate_size": opts.dense_width(routing.dense_active_experts),
                "attention_bias": False, "mlp_bias": False}
    return {"model_type": "mixtral", **common, "intermediate_size": opts.expert_hidden,
            "num_local_experts": opts.num_experts, "num_experts_per_tok": routing.options.k,
            "router_jitter_noise": 0.0, "sliding_window": None}


def export(model: nn.Module, routing: RoutingSpec, vocab_size: int, max_seq_len: int, folder: Path) -> Path:
    """Write `model` (a Llama of ours, in one process) as a save_pretrained checkpoint in `folder`."""
    return write(model.opts, exported_state(model), routing, vocab_size, max_seq_len, folder)


def write(opts, state: dict[str, torch.Tensor], routing: RoutingSpec, vocab_size: int, max_seq_len: int,
          folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = hf_config(opts, routing, vocab_size, max_seq_len)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if opts.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"export does not cover the model: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(folder)
    return folder


def exported_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by transformers' names, fp32. Every rank of an expert-parallel model calls it: it
    gathers each MoE layer's experts over the expert-parallel group."""
    from moe_models.moe_ffn import MoEFeedForward

    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not model.opts.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}.{norm}.weight"] = getattr(block, norm).weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{prefix}.self_attn.{proj}.weight"] = getattr(block.self_attn, proj).weight
        if isinstance(block.mlp, MoEFeedForward):
            state[f"{prefix}.mlp.gate.weight"] = block.mlp.router.proj.weight
            up, down = stacked_experts(block.mlp)
            state[f"{prefix}.mlp.experts.gate_up_proj"], state[f"{prefix}.mlp.experts.down_proj"] = up, down
        else:
            gate, up = block.mlp.up.weight.chunk(2, dim=0)  # ExpertFFN's SwiGLU up holds [gate; up]
            state.update({f"{prefix}.mlp.gate_proj.weight": gate, f"{prefix}.mlp.up_proj.weight": up,
                          f"{prefix}.mlp.down_proj.weight": block.mlp.down.weight})
    return {k: v.detach().float().clone() for k, v in state.items()}


def stacked_experts(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 2F, D) and (E, D, F) expert weights, whichever backend holds them (through its per-expert state dict);
    under expert parallelism gathered from every rank of the layer's group (rank r holds [r*n, (r+1)*n))."""
    from moe_models.pretrained.router_swap import LOCAL_EXPERTS

    state = layer.state_dict()
    prefix = f"dispatch.{LOCAL_EXPERTS}"
    spec = layer.dispatch.spec
    local = spec.num_experts // spec.ep_size
    up = torch.stack([state[f"{prefix}.{e}.up.weight"] for e in range(local)])
    down = torch.stack([state[f"{prefix}.{e}.down.weight"] for e in range(local)])
    if spec.ep_size == 1:
        return up, down
    group = expert_parallel_group(layer)
    return tuple(_all_gather(t, group, spec.ep_size) for t in (up, down))


def expert_parallel_group(layer):
    """The process group DeepSpeed gave the layer's experts (set when its engine was built)."""
    for module in layer.dispatch.modules():
        group = getattr(module, "ep_group", None)
        if group is not None:
            return group
    raise RuntimeError("an expert-parallel layer without its process group: build its DeepSpeed engine first")


def _all_gather(local: torch.Tensor, group, ep_size: int) -> torch.Tensor:
    """Every rank's `local` stacked in rank order along dim 0."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(ep_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)
