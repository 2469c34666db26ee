"""The `hf` model family: any transformers causal LM, by hub name, local folder, or a finished cell of the same study
(`cell:<model>/<router>`), trained in the same Ray Train + DeepSpeed cell as our own models.

Attention, norms and embeddings stay transformers' own modules; only the MLP slots change (modules are replaced, no
modeling code is copied):
  * an MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): every MoE block becomes our MoEFeedForward with the
    study's router (router_swap.py);
  * a dense checkpoint (GPT-2, Llama, Qwen2, Mistral) with `upcycle:`: every moe_every-th MLP becomes one whose
    experts are its copies (upcycle.py);
  * the dense baseline (`router: dense`) of a dense checkpoint trains it unchanged.
A swapped MoE checkpoint is read tensor by tensor, each expert-parallel rank reading only its own experts
(expert_sharded_load.py); everything else is loaded by transformers' `from_pretrained`, in the training precision.
Our MoE layers need each token's id (hash routing) and domain label (the reference router), which transformers'
decoder layers do not pass to `mlp`: the model feeds them to its MoE layers' shared MoERecorder, as every family does.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from moe_models.models.common import LMOutput, next_token_output
from moe_models.moe_ffn import MoEAux, MoEFeedForward, share_recorder
from moe_models.models.options import HFOptions, routing_problem
from moe_models.pretrained.architecture import Architecture
from moe_models.pretrained.expert_sharded_load import ExpertReader, load_without_experts, still_on_meta
from moe_models.routers import RouterContext
from moe_models.spec import RoutingSpec


def decoder_layers(hf: nn.Module) -> nn.ModuleList:
    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    for path in ("model.layers", "transformer.h"):
        try:
            return base.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(base).__name__}: no decoder layers at model.layers or transformer.h")


class HFCausalLM(nn.Module):
    def __init__(self, opts: HFOptions, routing: RoutingSpec, vocab_size: int, max_seq_len: int, seed: int,
                 num_domains: int = 0, token_counts_V: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        """dtype: what the checkpoint is loaded in, the training precision's (bf16 training never holds an fp32 copy
        of the model); the new MoE layers' experts are cast to it one layer at a time, their routers stay fp32."""
        super().__init__()
        from transformers import AutoConfig

        self.opts = opts
        arch = Architecture.from_config(AutoConfig.from_pretrained(opts.pretrained).to_dict())
        self.d_model, self.attention_layers = arch.hidden_size, arch.num_layers  # for cost.py's FLOPs
        _check_fits(arch, routing, opts, vocab_size, max_seq_len)
        self.hf, reader = _load(opts.pretrained, dtype, swapping=arch.is_moe and not routing.is_dense)
        self.hf.config.use_cache = False
        ep_rank = dist.get_rank() % opts.ep_size if dist.is_available() and dist.is_initialized() else 0
        for i, layer in enumerate(decoder_layers(self.hf)):
            ctx = RouterContext(arch.hidden_size, 0, vocab_size, i, seed, num_domains, token_counts_V)
            moe = self._routed(layer.mlp, i, arch, routing, ctx, ep_rank, reader)
            if moe is not None:
                for part in (moe.dispatch, moe.shared_experts, moe.shared_expert_gate):
                    if part is not None:
                        part.to(dtype)  # built fp32 from the checkpoint's tensors; at its dtype before the next layer
                # `mlp(hidden_states) -> hidden_states`, as transformers calls it (GPT-OSS's layer takes a pair)
                layer.mlp = PairOutput(moe) if arch.mlp_returns_pair else moe
        self.moe_recorder = share_recorder(self)
        # What this rank read from the checkpoint, by tensor name (empty where from_pretrained loaded it whole), and
        # the share of a swapped MoE checkpoint's experts among it.
        self.checkpoint_reads: tuple[str, ...] = tuple(reader.tensors.reads) if reader else ()
        self.checkpoint_expert_share: float | None = None
        if arch.is_moe and not routing.is_dense:
            self.checkpoint_expert_share = reader.experts_read / (reader.blocks * arch.num_experts) if reader else 1.0
        left = still_on_meta(self.hf)
        if left:
            raise ValueError(f"{opts.pretrained}: {', '.join(left[:5])} not loaded (no MoE block of a known kind)")

    def _routed(self, mlp: nn.Module, index: int, arch: Architecture, routing: RoutingSpec, ctx: RouterContext,
                ep_rank: int, reader: ExpertReader | None) -> MoEFeedForward | None:
        from moe_models.pretrained.router_swap import is_moe_block, swap_in
        from moe_models.pretrained.upcycle import upcycle

        if routing.is_dense:
            return None
        if arch.is_moe:
            if not is_moe_block(mlp):
                return None  # a Qwen-MoE layer kept dense (mlp_only_layers)
            local = arch.num_experts // self.opts.ep_size
            experts = reader.experts(mlp.experts, index, ep_rank * local, local) if reader else None
            return swap_in(mlp, routing, replace(ctx, num_experts=arch.num_experts), self.opts.dispatch,
                           self.opts.ep_size, ep_rank, self.opts.init_router, experts)
        up = self.opts.upcycle
        if not up.is_moe_layer(index):
            return None
        return upcycle(mlp, self.hf.config, up, routing, replace(ctx, num_experts=up.num_experts),
                       self.opts.dispatch, self.opts.ep_size, ep_rank)

    def logits(self, input_ids_BS: torch.Tensor,
               domain_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, MoEAux]]:
        """The checkpoint's logits, and what its MoE layers recorded on the way."""
        self.moe_recorder.begin(input_ids_BS, domain_ids_BS)
        return self.hf(input_ids=input_ids_BS).logits, self.moe_recorder.take()

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor,
                domain_ids_BS: torch.Tensor | None = None) -> LMOutput:
        logits_BSV, aux = self.logits(input_ids_BS, domain_ids_BS)
        return next_token_output(logits_BSV, targets_BS, aux)

    def new_decoding_state(self):
        """transformers' own key/value cache (moe_models/models/kv_cache.py decodes with it)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def decode_step(self, input_ids_BS: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits (B, V) after these tokens, which follow the cached ones."""
        self.moe_recorder.begin(input_ids_BS)  # hash routing reads the token ids
        logits = self.hf(input_ids=input_ids_BS, past_key_values=cache, use_cache=True).logits[:, -1]
        self.moe_recorder.take()
        return logits


def _load(pretrained: str, dtype: torch.dtype, swapping: bool) -> tuple[nn.Module, ExpertReader | None]:
    """The checkpoint at dtype. Where router swap replaces its MoE blocks, every tensor but the experts is loaded and
    each rank reads only its own experts later (expert_sharded_load.py); otherwise, or where the checkpoint's experts
    are not named as that expects, transformers loads it whole."""
    from transformers import AutoModelForCausalLM

    loaded = load_without_experts(pretrained, dtype) if swapping else None
    if loaded is not None:
        return loaded
    return AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype), None


class PairOutput(nn.Module):
    """Our MoE layer where the decoder layer unpacks (hidden_states, router_scores) from its mlp."""

    def __init__(self, moe: MoEFeedForward):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.moe(hidden_states), None


def _check_fits(arch: Architecture, routing: RoutingSpec, opts: HFOptions, vocab_size: int, max_seq_len: int) -> None:
    """What the study validator checks too, repeated where the checkpoint is finally loaded."""
    if vocab_size > arch.vocab_size:
        raise ValueError(f"the dataset's vocabulary ({vocab_size}) is larger than the checkpoint's "
                         f"({arch.vocab_size}): tokenize it with the checkpoint's tokenizer")
    if arch.max_positions and max_seq_len > arch.max_positions:
        raise ValueError(f"seq_len {max_seq_len} exceeds the checkpoint's {arch.max_positions} positions")
    problem = routing_problem(arch, opts, routing.is_dense)
    if problem:
        raise ValueError(problem)


