"""LoRA fine-tuning of a pretrained summarization baseline (HF seq2seq or causal LM) on the study's training pairs,
inside its Ray task, before it decodes the test documents: PEFT adapters on the attention projections (PEFT's
default per model type, or the study's target_modules), AdamW on the adapters only. A seq2seq model learns the
summary as its labels; a causal LM learns it as the continuation of the prompt, the prompt's tokens masked out of the
loss. Pairs are drawn by a seeded generator, so a baseline fine-tunes the same way every time."""
from __future__ import annotations

from typing import Callable

import torch

from workflows.metric_names import SUMMARY_PARAMS_TOTAL, SUMMARY_PARAMS_TRAINABLE
from workflows.study.sections import BaselineFinetune, PretrainedBaseline

IGNORE = -100  # transformers' label for positions outside the loss


def truncated_documents(tokenizer, documents: list[str], limit: int) -> list[str]:
    """Cut each document to `limit` tokens of the model's tokenizer (the instruction around it is never cut)."""
    ids = tokenizer(documents, truncation=True, max_length=limit, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(i, skip_special_tokens=True) for i in ids]


def _seq2seq_batch(tokenizer, inputs: list[str], summaries: list[str], target_tokens: int) -> dict:
    batch = tokenizer(inputs, return_tensors="pt", padding=True)
    labels = tokenizer(text_target=summaries, return_tensors="pt", padding=True, truncation=True,
                       max_length=target_tokens)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = IGNORE
    return {**batch, "labels": labels}


def _causal_batch(tokenizer, inputs: list[str], summaries: list[str], target_tokens: int) -> dict:
    rows, targets = [], []
    for prompt, summary in zip(inputs, summaries):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        summary_ids = tokenizer(" " + summary, add_special_tokens=False)["input_ids"][:target_tokens]
        summary_ids = summary_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + summary_ids)
        targets.append([IGNORE] * len(prompt_ids) + summary_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets])}


def finetune_lora(model, tokenizer, baseline: PretrainedBaseline, documents: list[str], summaries: list[str],
                  source_limit: int, target_tokens: int, log: Callable[[dict[str, float], int], None]):
    """The PEFT-wrapped model after `baseline.finetune.steps` AdamW steps on (document, summary) pairs."""
    from peft import LoraConfig, TaskType, get_peft_model

    ft: BaselineFinetune = baseline.finetune
    causal = baseline.kind == "causal"
    config = LoraConfig(r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout, target_modules=ft.target_modules,
                        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_2_SEQ_LM)
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log({SUMMARY_PARAMS_TRAINABLE: float(sum(p.numel() for p in trainable)),
         SUMMARY_PARAMS_TOTAL: float(sum(p.numel() for p in model.parameters()))}, 0)
    optimizer = torch.optim.AdamW(trainable, lr=ft.lr)
    inputs = [baseline.input_text(d) for d in truncated_documents(tokenizer, documents, source_limit)]
    make_batch = _causal_batch if causal else _seq2seq_batch
    generator = torch.Generator().manual_seed(ft.seed)
    device = next(model.parameters()).device
    model.train()
    for step in range(1, ft.steps + 1):
        picks = torch.randint(0, len(inputs), (ft.batch_size,), generator=generator).tolist()
        batch = make_batch(tokenizer, [inputs[i] for i in picks], [summaries[i] for i in picks], target_tokens)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == ft.steps:
            log({"finetune/loss": float(loss.detach())}, step)
    return model.eval()
