"""The study file's schema: a grid routers x models x datasets x seeds sharing one training, one resources and one
summarization section, with the checks that span sections. Validated before anything launches."""
from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field, NonNegativeInt, ValidationError, model_validator

from moe_models.models import MODELS
from moe_models.options import NAME_PATTERN, StrictOptions
from moe_models.pretrained.source import CELL_PREFIX
from moe_models.routers import ROUTER_OPTIONS
from moe_models.spec import DENSE
from tuning.sweep_config import SweepConfig
from workflows.study.claims import Claim, fixed_by_construction
from workflows.study.entries import DatasetEntry, ModelEntry, RouterEntry, distinct_router_names
from workflows.study.errors import problems_of, short
from workflows.study.pretrained_sources import experts_and_moe_layers, hf_problems
from workflows.study.sections import FaultInjection, ResourcesConfig, SummarizationConfig, TrainingConfig


class Study(StrictOptions):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    # The router label every other router is tested against in the pooled report (paired over seeds).
    baseline: str | None = None
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1)
    routers: list[RouterEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    fault_injection: FaultInjection | None = None
    sweep: SweepConfig | None = None
    summarization: SummarizationConfig = SummarizationConfig()
    # Hypotheses `moelab aggregate` decides from the finished cells (workflows/study/claims.py).
    claims: list[Claim] = []

    @model_validator(mode="before")
    @classmethod
    def _name_router_variants(cls, data: Any) -> Any:
        """Routers whose generated names collide get names that say how they differ (distinct_router_names)."""
        if not isinstance(data, dict) or not isinstance(data.get("routers"), list):
            return data
        try:
            entries = [r if isinstance(r, RouterEntry) else RouterEntry.model_validate(r) for r in data["routers"]]
        except (ValidationError, TypeError, ValueError):
            return data  # the routers field's own validation names what is wrong
        names = distinct_router_names(entries)
        if not any(names):
            return data
        return {**data, "routers": [e.model_copy(update={"label": n}) if n else raw
                                    for raw, e, n in zip(data["routers"], entries, names)]}

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
        models = [m.display() for m in self.models]  # tables and plots key their rows by these names
        for dup in sorted({x for x in models if models.count(x) > 1}):
            problems.append(f"models: two entries display as {dup!r}; give them distinct `label`s")
        shapes = [experts_and_moe_layers(self, j) for j in range(len(self.models))]
        for j, model in enumerate(self.models):
            if model.name == "hf":
                problems.extend(hf_problems(self, j))
        for j, model in enumerate(self.models):
            for name in model.routers or []:
                if name not in labels:
                    problems.append(f"models[{j}].routers: {short(name)} is not a router of this study; valid: "
                                    f"{', '.join(labels)}")
        for i, router in enumerate(self.routers):
            if router.options.get("dense_gradient") and router.capacity_factor is not None:
                problems.append(f"routers[{i}].dense_gradient: the dense router gradient runs every expert on every "
                                "token, which a capacity factor would drop; leave capacity_factor out (dropless)")
            for j, model in enumerate(self.models):
                if shapes[j] is None or not shapes[j][0] or not model.crossed_with(router):
                    continue  # an unreadable source is reported above
                experts = shapes[j][0]
                if router.name != DENSE and router.max_experts_per_token(experts) > experts:
                    problems.append(f"routers[{i}]: routes up to {router.max_experts_per_token(experts)} experts per token; "
                                    f"allowed: at most models[{j}].num_experts={experts}")
                if router.name != DENSE:
                    for option, problem in router.routing_spec().options.layer_problems(experts):
                        problems.append(f"routers[{i}].{option}: {problem} (models[{j}].num_experts={experts})")
                if (router.name != DENSE and not ROUTER_OPTIONS.get(router.name).causal and not router.allow_non_causal
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
        if self.training.routing_trace_tokens and any(d.task == "summarization" for d in self.datasets):
            problems.append("training.routing_trace_tokens: the routing trace covers LM cells only (an encoder-decoder "
                            "routes two token streams); leave it 0 in a summarization study")
        systems = labels + [p.display() for p in self.summarization.pretrained]
        if self.baseline is not None and self.baseline not in labels:
            problems.append(f"baseline: {short(self.baseline)} is not a router of this study; valid: {', '.join(labels)}")
        baseline = self.summarization.baseline
        if baseline is not None and baseline not in systems:
            problems.append(f"summarization.baseline: {baseline!r} is not a router or pretrained baseline of this "
                            f"study; valid: {', '.join(systems)}")
        for dup in sorted({x for x in systems if systems.count(x) > 1} - {x for x in labels if labels.count(x) > 1}):
            problems.append(f"summarization.pretrained: {dup!r} names two systems; give them distinct `label`s")
        if self.sweep:
            problems.extend(self._sweep_problems(labels, shapes))
        if self.training.precision == "fp16":
            problems.extend(self._fp16_problems())
        for j, model in enumerate(self.models):
            ep = model.resolved_options().ep_size
            if self.resources.workers_per_cell % ep:
                problems.append(f"models[{j}].ep_size: {ep} must divide resources.workers_per_cell="
                                f"{self.resources.workers_per_cell}")
        problems.extend(self._duplicate_problems())
        problems.extend(self._moe_block_problems(shapes))
        problems.extend(self._claim_problems(labels))
        if problems:
            raise ValueError("\n".join(dict.fromkeys(problems)))  # each once, in order
        return self

    def _claim_problems(self, labels: list[str]) -> list[str]:
        problems = []
        routers = {r.display(): r for r in self.routers}
        names = [c.name for c in self.claims]
        for i, claim in enumerate(self.claims):
            where = f"claims[{i}]"
            if names.count(claim.name) > 1:
                problems.append(f"{where}.name: {claim.name!r} names two claims")
            by_value = claim.matched_compute is not None or claim.against_value is not None  # no router against
            against = None if by_value else claim.compared(self.baseline)
            if against is None and not by_value:
                problems.append(f"{where}.against: name the router it is compared with (the study has no baseline)")
            sides = [("system", claim.system), ("against", against)]
            if claim.matched_compute is not None:
                sides += [("matched_compute.references", r) for r in claim.matched_compute.references]
            for field, label in sides:
                if label is None:
                    continue
                if label not in routers:
                    problems.append(f"{where}.{field}: {short(label)} is not a router of this study; valid: "
                                    f"{', '.join(labels)}")
                    continue
                router = routers[label]
                why = fixed_by_construction(router.name, router.routing_spec().options, claim.metric)
                if why:
                    problems.append(f"{where}.metric: {claim.metric} of {label} is fixed by construction ({why}): "
                                    "a claim on it would be true or false before any training, not a finding")
            if claim.matched_compute is not None and claim.system in claim.matched_compute.references:
                problems.append(f"{where}.matched_compute.references: the system itself is among them")
            if claim.against_dataset is not None and claim.against_dataset not in [d.name for d in self.datasets]:
                problems.append(f"{where}.against_dataset: {short(claim.against_dataset)} is not a dataset of this study")
            if claim.system == against and claim.against_dataset is None:
                problems.append(f"{where}.against: a router compared with itself")
            if claim.model is not None and claim.model not in [m.display() for m in self.models]:
                problems.append(f"{where}.model: {short(claim.model)} is not a model of this study")
            if claim.dataset is not None and claim.dataset not in [d.name for d in self.datasets]:
                problems.append(f"{where}.dataset: {short(claim.dataset)} is not a dataset of this study")
        return problems

    def _duplicate_problems(self) -> list[str]:
        """Entries that would make the same cell twice (same id: one would overwrite the other's run)."""
        problems = [f"seeds: {seed} is listed more than once"
                    for seed, times in sorted(Counter(self.seeds).items()) if times > 1]
        for field, keys in (("routers", [{**r.resolved(), "label": None} for r in self.routers]),
                            ("models", [{**m.resolved(), "label": None} for m in self.models]),
                            ("datasets", [d.model_dump() for d in self.datasets])):
            for i, key in enumerate(keys):
                if key in keys[:i]:
                    problems.append(f"{field}[{i}]: trains the same as {field}[{keys.index(key)}] (labels aside); "
                                    "remove one, or change an option")
        return problems

    def _moe_block_problems(self, shapes: list[tuple[int, int] | None]) -> list[str]:
        routed = [i for i, r in enumerate(self.routers) if r.name != DENSE]
        if not routed:
            return []
        problems = []
        for j, model in enumerate(self.models):
            if shapes[j] is None or not shapes[j][0] or shapes[j][1]:
                continue  # unreadable (reported), dense (reported), or it has MoE blocks
            opts = model.resolved_options()
            crossed = [i for i in routed if model.crossed_with(self.routers[i])]
            if not crossed:
                continue
            field, every = ("upcycle.moe_every", opts.upcycle.moe_every) if model.name == "hf" \
                else ("moe_every", opts.moe_every)
            problems.append(f"models[{j}].{field}: {every} leaves {model.display()} without an MoE block, yet "
                            f"routers[{crossed[0]}] ({self.routers[crossed[0]].display()}) routes; set {field} "
                            "between 1 and the number of layers")
        return problems

    def warnings(self) -> list[str]:
        """What validates but is probably not meant; `moelab validate` and `run` print these to stderr."""
        warnings = self.training.warnings()
        routed = [r for r in self.routers if r.name != DENSE]
        dense_widths = {r.active_experts for r in self.routers if r.name == DENSE}
        if len(routed) >= 2 and len(dense_widths) < 2:
            warnings.append("routers: compared on quality without dense baselines of two widths ({name: dense} with "
                            "active_experts of the routed experts per token, and of num_experts): the report cannot "
                            "tell whether expert capacity matters at this size")
        untokenized = [d.name for d in self.datasets if d.tokenizer is None and d.task == "lm"]
        for j, model in enumerate(self.models):
            pretrained = str(model.options.get("pretrained", ""))
            if model.name == "hf" and not pretrained.startswith(CELL_PREFIX) and untokenized:
                warnings.append(f"models[{j}].pretrained: {pretrained!r} reads token ids of a BPE trained on "
                                f"{', '.join(untokenized)}, not of its own tokenizer; set datasets[].tokenizer to the "
                                "checkpoint (unless it was trained on that BPE, as moelab's exports are)")
        warnings.extend(self._memory_warnings())
        return warnings

    def _memory_warnings(self) -> list[str]:
        """An `hf` model whose estimated state per rank exceeds resources.memory_per_worker_gb."""
        from workflows.study.memory import GiB
        from workflows.study.pretrained_sources import model_memory

        limit = self.resources.memory_per_worker_gb
        if limit is None:
            return []
        warnings = []
        for j, model in enumerate(self.models):
            memory = model_memory(self, j) if model.name == "hf" else None
            if memory is not None and max(memory.steady, memory.load_peak) > limit * GiB:
                warnings.append(f"models[{j}] ({model.display()}): {memory.describe()}, more than "
                                f"resources.memory_per_worker_gb={limit:g}; raise zero_stage, ep_size or "
                                "workers_per_cell, or train LoRA adapters (training.lora)")
        return warnings

    def _fp16_problems(self) -> list[str]:
        problems = []
        if self.resources.gpus_per_worker == 0:
            problems.append("training.precision: fp16 needs GPU workers (resources.gpus_per_worker > 0); DeepSpeed "
                            "runs fp16 on few CPUs (those with AVX512-FP16): use bf16 or fp32 on CPU")
        if self.training.zero_stage == 0:  # tests/workflows/test_precision.py holds DeepSpeed to this
            problems.append("training.zero_stage: fp16 needs ZeRO stage 1 or 2; at stage 0 DeepSpeed 0.19.8 never "
                            "applies the loss scale, yet divides the gradients by it (deepspeedai/DeepSpeed#8393)")
        return problems

    def _sweep_problems(self, labels: list[str], shapes: list[tuple[int, int] | None]) -> list[str]:
        sweep, problems = self.sweep, []
        for field, chosen, valid in (("routers", sweep.routers, labels),
                                     ("models", sweep.models, [m.display() for m in self.models]),
                                     ("datasets", sweep.datasets, [d.name for d in self.datasets])):
            for name in chosen:
                if name not in valid:
                    problems.append(f"sweep.{field}: {name!r} is not in the study; valid: {', '.join(valid)}")
        swept = [m for m in self.models if not sweep.models or m.display() in sweep.models]
        for model in swept:
            if model.name == "hf" and str(model.options.get("pretrained", "")).startswith(CELL_PREFIX):
                problems.append(f"sweep.models: {model.display()!r} starts from a cell: source, which sweeps do not "
                                "run first; sweep a model with a folder or hub checkpoint, or list others in "
                                "sweep.models")
        min_experts = min((shape[0] for shape in shapes if shape and shape[0]), default=1)
        for router in self.sweep_routers():
            for key, dim in sweep.space.items():
                # A path of identifiers reads as a field path (sweep.space.balancing.switch_lbl); anything else is
                # quoted, so the message still names one field.
                path = key if all(part.isidentifier() for part in key.split(".")) else repr(key)
                for value in dim.probe_values():
                    try:
                        swept = router.with_overrides({key: value})
                    except ValidationError as err:
                        msg = "; ".join(p.split(": ", 1)[-1] for p in problems_of(err))
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
