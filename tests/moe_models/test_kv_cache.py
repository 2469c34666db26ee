"""Greedy decoding with a key/value cache (moe_models/models/kv_cache.py): every cached step's logits are the full
forward's logits at that position, so the cached and the re-run-the-prefix decodings pick the same tokens, for
each decoder family and for learned, hash and dense routing (hash reads the step's own token ids)."""
import pytest
import torch

from moe_models.models import MODELS
from moe_models.models.kv_cache import LayerCache, greedy_decode
from moe_models.routers import ROUTERS
from moe_models.spec import DENSE, RoutingSpec

V, S = 64, 24
ROUTINGS = {"topk": RoutingSpec("topk", ROUTERS.get("topk").Options(k=2)),
            "hash": RoutingSpec("hash", ROUTERS.get("hash").Options(k=1)),
            "dense": RoutingSpec(DENSE)}
FAMILIES = {"gpt": {}, "llama": {"n_kv_heads": 2}}


def model(family: str, routing: RoutingSpec):
    torch.manual_seed(0)
    options = MODELS.get(family).Options(d_model=32, n_layers=3, n_heads=4, num_experts=4, expert_hidden=48,
                                         **FAMILIES[family])
    return MODELS.get(family).build(options, routing, V, S, 0).eval()


def uncached_decode(m, prompt_BS: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: the whole sequence re-run through the training forward for every new token; the logits it
    picked from (read off the LM head)."""
    seen = []
    hook = m.lm_head.register_forward_hook(lambda module, inputs, out: seen.append(out))
    tokens, picked = prompt_BS, []
    with torch.no_grad():
        for _ in range(new_tokens):
            m(tokens, tokens)
            picked.append(seen[-1][:, -1])
            tokens = torch.cat([tokens, picked[-1].argmax(-1, keepdim=True)], dim=1)
    hook.remove()
    return tokens, picked


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_greedy_decoding_is_the_full_forward_token_for_token(family, routing):
    m = model(family, ROUTINGS[routing])
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    expected, reference_logits = uncached_decode(m, prompt, 12)
    assert torch.equal(greedy_decode(m, prompt, 12), expected)
    caches = m.new_decoding_state()  # and each step's logits, not only their argmax
    with torch.no_grad():
        steps = [m.decode_step(prompt, caches)]
        steps += [m.decode_step(expected[:, i:i + 1], caches) for i in range(6, 6 + 11)]
    for got, want in zip(steps, reference_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_several_new_tokens_after_a_prefill_are_refused():
    m = model("gpt", ROUTINGS["topk"])
    caches = [LayerCache() for _ in m.blocks]
    with torch.no_grad():
        m.decode_step(torch.zeros(1, 4, dtype=torch.long), caches)
        with pytest.raises(ValueError, match="decode one token at a time"):
            m.decode_step(torch.zeros(1, 2, dtype=torch.long), caches)


@pytest.mark.parametrize("routing", ["topk", "hash"])
def test_a_router_swapped_checkpoint_decodes_with_transformers_cache_as_its_full_forward(tmp_path, routing):
    from moe_models.models.hf import HFCausalLM, HFOptions
    from tests.hf_tiny import tiny_causal_lm

    folder = tiny_causal_lm("mixtral", tmp_path / "mixtral", vocab_size=V)
    torch.manual_seed(0)
    m = HFCausalLM(HFOptions(pretrained=str(folder)), ROUTINGS[routing], V, S, seed=0).eval()
    hook_target = m.hf.lm_head
    seen = []
    hook = hook_target.register_forward_hook(lambda module, inputs, out: seen.append(out))
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    tokens = prompt
    with torch.no_grad():
        for _ in range(10):
            m(tokens, tokens)
            tokens = torch.cat([tokens, seen[-1][:, -1].argmax(-1, keepdim=True)], dim=1)
    hook.remove()
    assert torch.equal(greedy_decode(m, prompt, 10), tokens)


@pytest.mark.parametrize("routing", ["topk", "hash"])
def test_the_encoder_decoder_decodes_with_its_caches_as_its_full_decoder(routing):
    """Self-attention keys and values cached, the memory's cross-attention ones computed once: the same tokens and
    logits as re-running the decoder over the whole prefix against the encoded source (padding in the source)."""
    seq2seq = MODELS.get("seq2seq")
    torch.manual_seed(0)
    m = seq2seq.build(seq2seq.Options(d_model=32, n_heads=2, encoder_layers=1, decoder_layers=2, num_experts=4,
                                      expert_hidden=32), ROUTINGS[routing], V, S, 0).eval()
    src = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    valid = torch.ones_like(src, dtype=torch.bool)
    valid[1, 7:] = False
    start = torch.zeros(2, 1, dtype=torch.long)
    tokens, reference_logits = start, []
    with torch.no_grad():
        m.moe_recorder.reset()
        memory = m.encode(src, valid)
        for _ in range(8):
            reference_logits.append(m.decode(memory, valid, tokens)[:, -1])
            m.moe_recorder.take()
            tokens = torch.cat([tokens, reference_logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_decode(m, start, 8, m.start_decoding(src, valid)), tokens)
    with torch.no_grad():
        state = m.start_decoding(src, valid)
        steps = [m.decode_step(tokens[:, i:i + 1], state) for i in range(8)]
    for got, want in zip(steps, reference_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
