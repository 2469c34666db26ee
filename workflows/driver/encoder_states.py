"""Hidden states of a pretrained encoder on the built-in domain corpus, for `moelab routers --hidden-states`: the
router-architectures report found random inputs unrepresentative, so routers are characterized on what a pretrained
model computes. Offline, the encoder is the bundled all-MiniLM-L6-v2; any HF encoder folder or cached hub name works.
Tokens of the three domains alternate document by document, each labelled with its domain."""
from __future__ import annotations

import torch

from moe_eval.bundled import resolve_model


WINDOW = 126  # tokens per forward, 128 with [CLS] and [SEP]


def _windows(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document cut into WINDOW-token pieces, in order."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        out += [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    return out


@torch.no_grad()
def encoder_hidden_states(name: str, tokens: int, max_chars_per_domain: int = 400_000
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, str]:
    """(x_TD last-layer states, token ids, domain ids, the tokenizer's vocabulary size, a title), T = tokens."""
    from transformers import AutoModel, AutoTokenizer

    from moe_data.builtin import load_domains

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    corpus = load_domains(max_chars_per_domain)
    windows = {d: _windows(tokenizer, [doc.text for doc in corpus.splits["test"] if doc.domain == d])
               for d in corpus.domains}
    start = [t for t in (tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,)
             if t is not None]
    end = [t for t in (tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,)
           if t is not None]
    states, ids, domains, collected = [], [], [], 0
    for round_windows in zip(*windows.values()):  # one window of each domain per round
        for domain, window in zip(corpus.domains, round_windows):
            input_ids = torch.tensor([start + window + end])
            keep = slice(len(start), len(start) + len(window))  # [CLS] window [SEP]: the window's own tokens
            states.append(model(input_ids=input_ids).last_hidden_state[0, keep])
            ids.append(input_ids[0, keep])
            domains.append(torch.full((len(window),), corpus.domains.index(domain)))
            collected += len(window)
        if collected >= tokens:
            break
    if collected < tokens:
        raise ValueError(f"the built-in corpus gave {collected} tokens, fewer than --tokens {tokens}")
    return (torch.cat(states)[:tokens], torch.cat(ids)[:tokens], torch.cat(domains)[:tokens], len(tokenizer),
            f"pretrained: {name}")
