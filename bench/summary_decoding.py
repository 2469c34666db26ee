"""Decoding summaries with the key/value cache against re-running the decoder over every prefix
(moe_models/generation.py), on the summarization study's seq2seq MoE shape (d_model 96, 8 experts, top-2): greedy
and beam search, at the lengths of the built-in study (8 tokens) and of XSum summaries (60), one batch of documents,
alternating the two paths and keeping each one's best of `--repeats`. The end symbol is banned, so every hypothesis
runs to full length. The tokens must agree; the ratio is the saving.

  python bench/summary_decoding.py --out bench/results/summary_decoding_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.moe_layer import emit  # noqa: E402

CASES = [(8, 1), (8, 4), (60, 1), (60, 4)]  # (new tokens, beams)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import moe_models.generation as generation
    from moe_models.models import MODELS
    from moe_models.routers import ROUTERS
    from moe_models.spec import RoutingSpec

    torch.manual_seed(0)
    family = MODELS.get("seq2seq")
    options = family.Options(d_model=96, n_heads=4, encoder_layers=2, decoder_layers=2, num_experts=8,
                             expert_hidden=96)
    model = family.build(options, RoutingSpec("topk", ROUTERS.get("topk").Options(k=2)), 2048, 128, 0).eval()
    src = torch.randint(1, 2048, (args.documents, 64))
    valid = torch.ones_like(src, dtype=torch.bool)
    choose = generation.caches_give_the_same_tokens
    ban = generation.ban_repeated_ngrams  # every hypothesis runs to full length: the end symbol is never chosen
    generation.ban_repeated_ngrams = lambda seqs, logp, n: ban(seqs, logp, n).index_fill(
        1, torch.tensor([0]), float("-inf"))
    rows = []
    for new_tokens, beams in CASES:
        settings = generation.GenerationSettings(max_new_tokens=new_tokens, num_beams=beams)
        best, tokens = {True: float("inf"), False: float("inf")}, {}
        for _ in range(args.repeats):
            for cached in (True, False):
                generation.caches_give_the_same_tokens = lambda _, c=cached: c
                began = time.perf_counter()
                tokens[cached] = generation.generate(model, src, valid, settings, eos=0)
                best[cached] = min(best[cached], time.perf_counter() - began)
        generation.caches_give_the_same_tokens = choose
        rows.append({"new_tokens": new_tokens, "beams": beams, "cached_s": round(best[True], 4),
                     "prefix_s": round(best[False], 4), "prefix_over_cached": round(best[False] / best[True], 2),
                     "same_tokens": tokens[True] == tokens[False]})
    emit({"bench": "summary_decoding", "documents": args.documents, "torch_threads": torch.get_num_threads(),
          "cases": rows}, args.out)


if __name__ == "__main__":
    main()
