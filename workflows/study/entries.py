"""The grid's axes as a study file writes them: router, model and dataset entries.

Router and model entries are a registry name plus that component's own options, written flat (`{name: topk, k: 2}`)
and validated by the component's pydantic Options: unknown keys are errors, every message names the field and the
allowed values.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from moe_data.sources import parse_name, task_of
from moe_data.spec import DataSpec
from moe_models.balancing import BALANCING_LOSSES
from moe_models.models import MODELS
from moe_models.options import StrictOptions
from moe_models.routers import ROUTER_OPTIONS
from moe_models.spec import DENSE, RoutingSpec
from workflows.study.identity import CELL_KEY, CellKeyUnlessDefault, NotCellKey


def _split_options(data: Any, own_fields: set[str]) -> Any:
    """Move every key that is not one of the entry's own fields into `options` (the component's Options)."""
    if not isinstance(data, dict):
        return data
    own = {k: v for k, v in data.items() if k in own_fields}
    own["options"] = {k: v for k, v in data.items() if k not in own_fields}
    return own


class RouterEntry(StrictOptions):
    name: Annotated[str, CELL_KEY]
    # display name in tables; defaults to name + options
    label: Annotated[str | None, NotCellKey("a display name")] = None
    # loss name -> coefficient
    balancing: Annotated[dict[str, NonNegativeFloat], CELL_KEY] = Field(default_factory=dict)
    # Over which tokens switch_lbl counts expert load: this micro-batch, each sequence, or the global batch
    # (all data-parallel ranks and all micro-batches of an optimizer step).
    balancing_scope: Annotated[Literal["micro_batch", "sequence", "global_batch"], CELL_KEY] = "micro_batch"
    capacity_factor: Annotated[PositiveFloat | None, CELL_KEY] = None  # None = dropless
    drop_policy: Annotated[Literal["position", "probs"], CELL_KEY] = "position"
    # dense baseline only: FFN hidden = active_experts * expert_hidden
    active_experts: Annotated[PositiveInt, CELL_KEY] = 1
    # A non-causal router (expert choice) in an autoregressive model sees future tokens; it runs there only if the
    # study says so here.
    allow_non_causal: Annotated[bool, NotCellKey("a permission the study grants, not a setting of the router")] = False
    options: Annotated[dict[str, Any], CELL_KEY] = Field(default_factory=dict)

    _split = model_validator(mode="before")(lambda data: _split_options(data, set(RouterEntry.model_fields) - {"options"}))

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name != DENSE and name not in ROUTER_OPTIONS:
            raise ValueError(f"unknown router {name!r}; valid: {', '.join(ROUTER_OPTIONS.names() + [DENSE])}")
        return name

    @field_validator("balancing")
    @classmethod
    def _known_losses(cls, balancing: dict[str, float]) -> dict[str, float]:
        for loss in balancing:
            BALANCING_LOSSES.check(loss)  # raises with the valid names
        return balancing

    @model_validator(mode="after")
    def _options(self) -> "RouterEntry":
        if self.name == DENSE:
            if self.options:
                raise ValueError(f"the dense baseline takes no router options, got: {', '.join(self.options)}")
        else:
            ROUTER_OPTIONS.get(self.name)(**self.options)
        return self

    def routing_spec(self) -> RoutingSpec:
        options = None if self.name == DENSE else ROUTER_OPTIONS.get(self.name)(**self.options)
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


def distinct_router_names(entries: list[RouterEntry]) -> list[str | None]:
    """A name for each unlabeled router whose generated name another one shares, or None where it needs none.
    Names are made of options, so two variants of one router that differ only in entry fields (a balancing loss, its
    scope, a capacity) would share one: each gets `+field=value` for the fields set apart from their defaults where
    the variants differ, e.g. `topk(k=2)+switch_lbl=0.01+balancing_scope=global_batch` (and plain `topk(k=2)`). A
    router with a label, or a name no other shares, keeps it: committed studies' names do not move."""
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        if entry.label is None:
            groups.setdefault(entry.display(), []).append(i)
    names: list[str | None] = [None] * len(entries)
    defaults = {field: info.get_default(call_default_factory=True) for field, info in RouterEntry.model_fields.items()}
    for base, members in groups.items():
        if len(members) < 2:
            continue
        fields = [entries[i].model_dump(exclude={"name", "label", "options"}) for i in members]
        differing = [f for f in fields[0] if any(x[f] != fields[0][f] for x in fields)]
        for i, values in zip(members, fields):
            parts = [_shown(field, values[field]) for field in differing if values[field] != defaults[field]]
            names[i] = "+".join([base, *parts]) if parts else None
    return names


def _shown(field: str, value: Any) -> str:
    if isinstance(value, dict):  # balancing: {switch_lbl: 0.01} reads as switch_lbl=0.01
        return "+".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(value.items()))
    return f"{field}={value:g}" if isinstance(value, float) else f"{field}={value}"


class ModelEntry(StrictOptions):
    name: Annotated[str, CELL_KEY]
    label: Annotated[str | None, NotCellKey("a display name")] = None
    # The router labels this model is crossed with (default: every router of the study). A pretrained source
    # trains under one router; an upcycled checkpoint's dense baseline is the checkpoint itself, once.
    routers: Annotated[list[str] | None,
                       NotCellKey("which routers it is crossed with")] = Field(default=None, min_length=1)
    options: Annotated[dict[str, Any], CELL_KEY] = Field(default_factory=dict)

    _split = model_validator(mode="before")(lambda data: _split_options(data, {"name", "label", "routers"}))

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

    def crossed_with(self, router: RouterEntry) -> bool:
        return self.routers is None or router.display() in self.routers


ADDED = "added after cells existed; the default is what they did"


class SplitNames(StrictOptions):
    """The dataset's own names for moelab's splits, where it calls them otherwise (validation: dev). A split the
    dataset lacks is carved out of its only split by a hash of each document's text (90/5/5)."""
    train: str = "train"
    validation: str = "validation"
    test: str = "test"


class DatasetEntry(StrictOptions):
    name: Annotated[str, CELL_KEY]  # builtin:<name> (moe_data/builtin.py: BUILTIN) | hf:<hub name> | file:<path>
    vocab_size: Annotated[int, CELL_KEY] = Field(default=2048, ge=260, le=65536)  # >= 256 byte symbols + specials
    max_chars_per_domain: Annotated[PositiveInt, CELL_KEY] = 400_000
    text_column: Annotated[str, CELL_KEY] = "text"  # the document column of a summarization dataset
    domain_column: Annotated[str | None, CELL_KEY] = "domain"
    # Set for (document, summary) datasets such as hf:xsum (text_column: document, summary_column: summary).
    summary_column: Annotated[str | None, CELL_KEY] = None
    hf_config: Annotated[str | None, CELL_KEY] = None
    # A pretrained checkpoint's tokenizer (folder or hub name) for LM data an `hf` model trains on; None = a BPE of
    # vocab_size trained on the corpus (what moelab's own models, and the checkpoints they export, use).
    tokenizer: Annotated[str | None, CELL_KEY] = None
    revision: Annotated[str | None, CellKeyUnlessDefault(ADDED)] = None  # a hub dataset's commit, tag or branch
    # Read a hub dataset as a stream: nothing is downloaded beyond the budgets (which it then needs).
    streaming: Annotated[bool, NotCellKey("how the rows are read, not which")] = False
    splits: Annotated[SplitNames, CellKeyUnlessDefault(ADDED)] = SplitNames()
    # Token budgets: the training split, and each of validation and test (None: all the data has). The validation
    # budget is the fixed evaluation set, evaluated in full.
    train_tokens: Annotated[PositiveInt | None, CellKeyUnlessDefault(ADDED)] = None
    eval_tokens: Annotated[PositiveInt | None, CellKeyUnlessDefault(ADDED)] = None
    # A domain mix: {domain: weight}; each domain gets its share of every budget, other domains are left out.
    domain_mix: Annotated[tuple[tuple[str, PositiveFloat], ...] | None, CellKeyUnlessDefault(ADDED)] = None
    tokenizer_sample_chars: Annotated[PositiveInt, CellKeyUnlessDefault(ADDED)] = 50_000_000

    @field_validator("name")
    @classmethod
    def _parse(cls, name: str) -> str:
        parse_name(name)
        return name

    @field_validator("domain_mix", mode="before")
    @classmethod
    def _mix_as_pairs(cls, mix: Any) -> Any:
        """Written as a mapping; held as (domain, weight) pairs in the file's order (a mapping is not hashable)."""
        return tuple(mix.items()) if isinstance(mix, dict) else mix

    @model_validator(mode="after")
    def _budgets_for_streams(self) -> "DatasetEntry":
        if self.streaming and (self.train_tokens is None or self.eval_tokens is None):
            raise ValueError("streaming: a stream may not end; set train_tokens and eval_tokens")
        if self.domain_mix is not None and (self.train_tokens is None or self.eval_tokens is None):
            raise ValueError("domain_mix: shares of a budget; set train_tokens and eval_tokens")
        if self.domain_mix is not None and len({d for d, _ in self.domain_mix}) != len(self.domain_mix):
            raise ValueError("domain_mix: a domain is named twice")
        return self

    @model_validator(mode="after")
    def _tokenizer_for_lm_data(self) -> "DatasetEntry":
        if self.tokenizer is not None and self.task != "lm":
            raise ValueError("tokenizer: summarization pairs are tokenized by a BPE trained on them; a pretrained "
                             "tokenizer applies to LM datasets")
        return self

    @property
    def task(self) -> str:
        return task_of(self.name, self.summary_column)

    def data_spec(self) -> DataSpec:
        """What moe_data prepares: this entry as its typed spec."""
        return DataSpec(self.name, self.vocab_size, self.max_chars_per_domain, self.text_column, self.domain_column,
                        self.summary_column, self.hf_config, self.revision, self.streaming,
                        tuple(self.splits.model_dump().items()), self.train_tokens, self.eval_tokens,
                        self.domain_mix, self.tokenizer, self.tokenizer_sample_chars)
