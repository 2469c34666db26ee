"""GPT-style decoder LM (nanoGPT layout) whose FFN is an MoE block every `moe_every` blocks.

Block.forward is two residual lines; the FFN slot holds either a dense ExpertFFN or a MoEFeedForward.
Shapes: B batch, S sequence, D model dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import re
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, confloat, model_validator
from torch import nn

from moe_models.dispatch import DISPATCH_BACKENDS, DispatchSpec
from moe_models.experts import ExpertFFN
from moe_models.moe_ffn import MoEAux, MoEFeedForward
from moe_models.routers import ROUTERS, RouterContext
from moe_models.spec import RoutingSpec


class GPTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: PositiveInt = 128
    n_layers: PositiveInt = 2
    n_heads: PositiveInt = 4
    num_experts: PositiveInt = 4
    expert_hidden: PositiveInt = 256  # F of each expert; the dense baseline scales it by its active experts
    moe_every: NonNegativeInt = 1  # MoE FFN in blocks where (index+1) % moe_every == 0; 0 = no MoE at all
    ep_size: PositiveInt = 1  # expert-parallel ranks (DeepSpeed ep_size); must divide num_experts
    dispatch: str = "deepspeed"
    dropout: confloat(ge=0, lt=1) = 0.0

    @model_validator(mode="after")
    def _check(self) -> "GPTOptions":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")
        if self.dispatch not in DISPATCH_BACKENDS:
            raise ValueError(f"dispatch={self.dispatch!r} unknown; valid: {', '.join(DISPATCH_BACKENDS.names())}")
        return self


@dataclass
class LMOutput:
    lm_loss: torch.Tensor  # mean next-token cross-entropy
    aux_loss: torch.Tensor  # sum over MoE layers of scaled balancing losses
    moe: dict[int, MoEAux] = field(default_factory=dict)  # block index -> that MoE layer's aux
    token_nll_BS: torch.Tensor | None = None  # per-token cross-entropy, detached (input difficulty)

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss + self.aux_loss


_LOCAL_EXPERT = re.compile(r"deepspeed_experts\.(\d+)\.")


def init_parameters(model: nn.Module, seed: int, ep_size: int) -> None:
    """GPT-2 init, N(0, 0.02) for Linear/Embedding weights and zero biases (PyTorch's N(0, 1) embedding init makes the
    tied LM head's first logits huge), drawn per parameter from a generator keyed by (seed, name) — and for experts by
    their *global* id — so every expert-parallel layout (ep_size, world size) starts from the same weights."""
    ep_rank = dist.get_rank() % ep_size if dist.is_available() and dist.is_initialized() else 0
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for kind, param in (("weight", module.weight), ("bias", getattr(module, "bias", None))):
            if param is None:
                continue
            name = f"{module_name}.{kind}"
            local = _LOCAL_EXPERT.search(name)
            if local:  # DeepSpeed places global experts [r*n, (r+1)*n) on expert-parallel rank r
                num_local = len(model.get_submodule(name[:local.end() - 1].rsplit(".", 1)[0]))
                name = _LOCAL_EXPERT.sub(f"global_expert.{ep_rank * num_local + int(local.group(1))}.", name)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            with torch.no_grad():
                if kind == "bias":
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(dim=2)
        y = F.scaled_dot_product_attention(  # (B, nh, S, hs)
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                domain_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attn(self.ln1(x))
        if isinstance(self.ffn, MoEFeedForward):
            y, aux = self.ffn(self.ln2(x), token_ids, domain_ids)
            return x + y, aux
        return x + self.ffn(self.ln2(x)), None


class GPT(nn.Module):
    def __init__(self, opts: GPTOptions, routing: RoutingSpec, vocab_size: int, max_seq_len: int, seed: int,
                 num_domains: int = 0, token_counts_V: torch.Tensor | None = None):
        super().__init__()
        self.opts = opts
        self.num_domains = num_domains
        self.token_counts_V = token_counts_V  # routers built from data statistics (balanced hash) read these
        self.tok_emb = nn.Embedding(vocab_size, opts.d_model)
        self.pos_emb = nn.Embedding(max_seq_len, opts.d_model)
        self.blocks = nn.ModuleList(
            Block(opts.d_model, opts.n_heads, opts.dropout, self._ffn(i, routing, vocab_size, seed))
            for i in range(opts.n_layers)
        )
        self.ln_f = nn.LayerNorm(opts.d_model)
        self.lm_head = nn.Linear(opts.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (nanoGPT)
        init_parameters(self, seed, opts.ep_size)

    def is_moe_block(self, index: int) -> bool:
        return self.opts.moe_every > 0 and (index + 1) % self.opts.moe_every == 0

    def _ffn(self, index: int, routing: RoutingSpec, vocab_size: int, seed: int) -> nn.Module:
        o = self.opts
        if routing.is_dense:
            return ExpertFFN(o.d_model, routing.dense_active_experts * o.expert_hidden)
        if not self.is_moe_block(index):
            return ExpertFFN(o.d_model, o.expert_hidden)
        ctx = RouterContext(o.d_model, o.num_experts, vocab_size, index, seed, self.num_domains, self.token_counts_V)
        router_cls = ROUTERS.get(routing.router)
        router = router_cls(ctx, routing.options or router_cls.Options())
        spec = DispatchSpec(o.d_model, o.expert_hidden, o.num_experts, o.ep_size,
                            routing.capacity_factor, routing.drop_policy)
        return MoEFeedForward(router, DISPATCH_BACKENDS.get(o.dispatch)(spec), routing.balancing,
                              routing.balancing_scope)

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor,
                domain_ids_BS: torch.Tensor | None = None) -> LMOutput:
        """domain_ids_BS (optional): each token's document domain, for domain analytics and the reference router."""
        positions = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        x = self.tok_emb(input_ids_BS) + self.pos_emb(positions)
        aux: dict[int, MoEAux] = {}
        for i, block in enumerate(self.blocks):
            x, layer_aux = block(x, input_ids_BS, domain_ids_BS)
            if layer_aux is not None:
                aux[i] = layer_aux
        logits_BSV = self.lm_head(self.ln_f(x))
        token_nll = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), reduction="none")
        lm_loss = token_nll.mean()
        aux_loss = sum((a.loss for a in aux.values()), lm_loss.new_zeros(()))
        return LMOutput(lm_loss, aux_loss, aux, token_nll.detach().view_as(targets_BS))
