"""Pretrained baselines as cells of their own: an HF seq2seq or causal LM (hub name or local path), as it is or after
LoRA fine-tuning on the training pairs (baseline_finetune.py), summarizes the same test documents with the study's decoding settings and is scored exactly like a trained cell (same per-document
predictions artifact), so the report compares it side by side and tests it against the baseline.

Each baseline runs as one Ray task with its own MLflow run (role 'pretrained'), identified by a hash of what it
evaluates: a finished one is not run again.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from workflows import storage
from workflows.cell.baseline_finetune import finetune_lora, truncated_documents
from workflows.cell.job import JobResult, PretrainedJob
from workflows.cell.summarize import score_and_log, test_documents
from workflows.metric_names import SUMMARY_GENERATE_SECONDS
from workflows.study.sections import PretrainedBaseline, SummarizationConfig
from workflows.tracking import Tracker


def _decoding(cfg: SummarizationConfig) -> dict:
    return {"num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty, "early_stopping": True,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_new_tokens": cfg.max_new_tokens}


def _source_limit(model, baseline: PretrainedBaseline, cfg: SummarizationConfig) -> int:
    """Document tokens that fit the model's positions, leaving room for the prompt (and for a causal LM the
    summary)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is None:
        return baseline.source_tokens
    positions -= 32  # the prompt's own tokens and special tokens
    if baseline.kind == "causal":
        positions -= cfg.max_new_tokens
    return max(1, min(baseline.source_tokens, positions))


def summarize_with(baseline: PretrainedBaseline, documents: list[str], cfg: SummarizationConfig,
                   train_pairs: tuple[list[str], list[str]] | None = None,
                   log: Callable[[dict[str, float], int], None] = lambda metrics, step: None) -> list[str]:
    """train_pairs: (documents, summaries) a `finetune:` baseline is LoRA-tuned on before it decodes."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(baseline.model)
    causal = baseline.kind == "causal"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Ray task holds the study's gpus_per_worker
    family = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
    model = family.from_pretrained(baseline.model).eval().to(device)
    if causal:
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    limit = _source_limit(model, baseline, cfg)
    if baseline.finetune:
        if train_pairs is None:
            raise ValueError(f"{baseline.display()}: fine-tuning needs the training pairs")
        model = finetune_lora(model, tokenizer, baseline, *train_pairs, limit, cfg.max_new_tokens, log)
    return _decode(model, tokenizer, baseline, documents, cfg, limit, device)


@torch.no_grad()
def _decode(model, tokenizer, baseline: PretrainedBaseline, documents: list[str], cfg: SummarizationConfig,
            limit: int, device: str) -> list[str]:
    causal = baseline.kind == "causal"
    outputs: list[str] = []
    for start in range(0, len(documents), cfg.eval_batch_size):
        # Truncate the document, not the instruction around it.
        docs = [baseline.input_text(d) for d in
                truncated_documents(tokenizer, documents[start:start + cfg.eval_batch_size], limit)]
        batch = tokenizer(docs, return_tensors="pt", padding=True).to(device)
        generated = model.generate(**batch, **_decoding(cfg), pad_token_id=tokenizer.pad_token_id)
        if causal:
            generated = generated[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        outputs += [t.strip().split("\n")[0].strip() if causal else t.strip() for t in texts]
    return outputs


def evaluate_pretrained(job: PretrainedJob) -> JobResult:
    """Ray task body: decode, score, log; returns how it ended."""
    from moe_data.prepare import load_prepared

    cell, tracker, run_id = job.cell, Tracker(job.tracking_uri), job.run_id
    try:
        data = load_prepared(storage.local_copy(job.data_path))
        began = time.perf_counter()
        documents = data.documents["test"][:test_documents(data, cell.summarization)]
        train = (data.documents["train"], data.summaries["train"]) if cell.baseline.finetune else None
        predictions = summarize_with(cell.baseline, documents, cell.summarization, train,
                                     lambda metrics, step: tracker.log_metrics(run_id, metrics, step))
        seconds = time.perf_counter() - began
        metrics = {**score_and_log(tracker, run_id, predictions, data, cell.summarization),
                   SUMMARY_GENERATE_SECONDS: seconds}
    except Exception as err:  # a missing model or a hub download without network: that cell fails, with reason
        return JobResult("FAILED", f"{type(err).__name__}: {err}"[:2000])
    tracker.log_metrics(run_id, metrics, 0)
    return JobResult("FINISHED")
