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
