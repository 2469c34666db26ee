"""Tiny randomly initialised HF models saved to a folder, standing in for pretrained baselines (no hub access here)."""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "</s>"


def _tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x): return x", "Return the value of the thing."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(folder)
    return fast


def tiny_bart(folder: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    tok = _tokenizer(folder)
    eos = tok.convert_tokens_to_ids(EOS)
    config = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=256,
                        pad_token_id=eos, bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos,
                        forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(folder)
    eos = tok.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=512, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def tiny_causal_lm(kind: str, folder: Path, vocab_size: int = 96, layers: int = 2) -> Path:
    """A randomly initialised causal LM of transformers' own classes, saved with save_pretrained (fp32)."""
    import torch
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    configs = {
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                                     bos_token_id=0, eos_token_id=0),
        "llama": lambda: T.LlamaConfig(**common, intermediate_size=48),
        "qwen2": lambda: T.Qwen2Config(**common, intermediate_size=48),
        "mixtral": lambda: T.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                              norm_topk_prob=False),
        "olmoe": lambda: T.OlmoeConfig(**common, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                       eos_token_id=0, pad_token_id=0, bos_token_id=0),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8),
        # DeepSeek-V3's block (GLM-4-MoE shares it): 8 experts in 4 groups, 2 groups kept, a dense first layer
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4, "num_hidden_layers": layers + 1}, intermediate_size=48,
            moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "glm4_moe": lambda: T.Glm4MoeConfig(
            **{**common, "num_hidden_layers": layers + 1}, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, routed_scaling_factor=1.8, norm_topk_prob=True),
        # GPT-OSS: a router with a logit bias, clamped-SwiGLU experts with biases, attention sinks, sliding windows
        "gpt_oss": lambda: T.GptOssConfig(
            **common, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2)),
    }
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(configs[kind]())
    with torch.no_grad():  # transformers' init leaves some weights tiny or zero; these make every path matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():  # DeepSeek-V3's selection bias starts at zero: make it matter
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
