"""Whole models on the meta device, in bf16 the way DeepSpeed 0.19.8's half-precision engines cast them (parameters
only; buffers keep their dtype), one training step each: every router on every model family (GPT with GELU experts
and with SwiGLU plus a gated shared expert, llama, seq2seq, transformers' Mixtral with our layer swapped in and
GPT-2 upcycled).

Meta tensors stand in for a GPU's, which cannot exist here. A tensor the model creates on the host (a factory without
device=), a buffer's fp32 leaking into bf16 activations, or a host read (.item(), a shape that depends on values)
fails here as it would fail, or stall the launch queue, on CUDA."""
import pytest
import torch

from moe_models.dispatch.grouped import GroupedDispatch
from moe_models.models import MODELS
from moe_models.models.common import LMOutput
from moe_models.routers import ROUTERS
from moe_models.spec import RoutingSpec
from tests.moe_models.test_modern_routing import MODERN

V = 100
ROUTER_OPTIONS = {"topk": {"k": 2}, "hash": {"k": 2}, "top_p": {"p": 0.5, "max_k": 4},
                  "entropy_adaptive": {"max_k": 3}, "top_any": {"init_threshold": -0.05},
                  "expert_choice": {"capacity": 1.5}, "mlp": {"k": 2}, "mlp_hadamard": {"k": 2},
                  "attention": {"k": 2}, "hybrid": {"k": 2}, "self_supervised": {"k": 2, "contrastive_tokens": 16}}
# The routing options of today's open models (tests/moe_models/test_modern_routing.py), as "<router>:<case>".
ROUTER_OPTIONS.update({"topk:deepseek_v3": MODERN["deepseek_v3"], "topk:gpt_oss": MODERN["gpt_oss"],
                       "topk:quantile": MODERN["quantile"], "topk:uniform": MODERN["uniform"],
                       "topk:null": MODERN["null"], "topk:densemixer": MODERN["densemixer"]})
READS_THE_HOST = {"reference": "checks for unlabelled domain ids on the host (the testbed's upper bound)"}
_DECODER = {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 64}
MODEL_CASES = {"gpt": ("gpt", _DECODER),
               "gpt-swiglu-shared": ("gpt", {**_DECODER, "expert_activation": "swiglu", "num_shared_experts": 1,
                                             "shared_expert_gate": True}),
               "llama": ("llama", {**_DECODER, "n_heads": 4, "n_kv_heads": 2}),
               "gpt-latent-first-dense": ("gpt", {**_DECODER, "moe_latent_size": 16, "first_k_dense": 1}),
               "seq2seq": ("seq2seq", {"d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                                       "num_experts": 4, "expert_hidden": 64}),
               # transformers' own models with our MoE layer swapped in / upcycled (checkpoints written per session)
               "hf-swapped-mixtral": ("hf", {"pretrained": "<mixtral>"}),
               "hf-upcycled-gpt2": ("hf", {"pretrained": "<gpt2>", "upcycle": {"num_experts": 4}})}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from tests.hf_tiny import tiny_causal_lm

    root = tmp_path_factory.mktemp("checkpoints")
    return {f"<{kind}>": str(tiny_causal_lm(kind, root / kind, vocab_size=V)) for kind in ("mixtral", "gpt2")}


def test_every_model_family_has_a_case():
    assert {family for family, _ in MODEL_CASES.values()} == set(MODELS.names())


def test_every_router_has_a_case():
    assert set(ROUTERS.names()) == {case.partition(":")[0] for case in ROUTER_OPTIONS} | set(READS_THE_HOST)


def half_precision_on_meta(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():  # DeepSpeed's _cast_module_mixed_precision: parameters only
        p.data = p.data.to(torch.bfloat16)
    return model.train().to("meta")


def meta_ids(*shape: int) -> torch.Tensor:
    return torch.randint(V, shape, device="meta")


def training_step(family: str, model: torch.nn.Module) -> LMOutput:
    if MODELS.get(family).task == "lm":
        return model(meta_ids(2, 32), meta_ids(2, 32))
    src_valid = torch.ones(2, 16, dtype=torch.bool, device="meta")
    return model(meta_ids(2, 16), src_valid, meta_ids(2, 8), meta_ids(2, 8))


@pytest.mark.parametrize("model_case", list(MODEL_CASES))
@pytest.mark.parametrize("router", list(ROUTER_OPTIONS))
def test_a_bf16_training_step_stays_on_the_models_device(router, model_case, monkeypatch, checkpoints):
    monkeypatch.setattr(GroupedDispatch, "grouped_gemm_applies", lambda self, x: True)  # the CUDA bf16 path
    model_name, model_options = MODEL_CASES[model_case]
    if "pretrained" in model_options:
        model_options = {**model_options, "pretrained": checkpoints[model_options["pretrained"]]}
        # transformers' own mask preparation reads the host once per forward (its packed-sequence check, skipped
        # while tracing): pretend to trace, so what is checked here is our layers inside its model.
        import transformers.masking_utils as masking

        monkeypatch.setattr(masking, "is_tracing", lambda *_: True)
    family = MODELS.get(model_name)
    name = router.partition(":")[0]
    routing = RoutingSpec(name, ROUTERS.get(name).Options(**ROUTER_OPTIONS[router]),
                          {"switch_lbl": 0.01, "z_loss": 0.001})
    model = half_precision_on_meta(family.build(family.Options(**model_options), routing, V, 64, 0))
    out = training_step(model_name, model)
    assert out.loss.device.type == "meta" and out.loss.dtype == torch.float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.is_meta, name
