"""Cell identity by declaration: every field of a cell's sections says whether it is part of the cell's id, the ids
of the committed studies never move, and changing a field changes the id exactly when its declaration says so."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel

from workflows.study.cells import PretrainedCell, expand, pretrained_cells
from workflows.study.entries import DatasetEntry, ModelEntry, RouterEntry
from workflows.study.identity import NotCellKey, decision, identity
from workflows.study.loading import load_study, parse_study
from workflows.study.sections import PretrainedBaseline, ResourcesConfig, SummarizationConfig, TrainingConfig

REPO = Path(__file__).resolve().parents[2]
SECTIONS = (RouterEntry, ModelEntry, DatasetEntry, TrainingConfig, ResourcesConfig, SummarizationConfig,
            PretrainedBaseline)
# The ids of every committed study's cells, recorded before identity moved onto the fields.
COMMITTED = json.loads((REPO / "tests" / "data" / "committed_cell_ids.json").read_text())

STUDY = {"name": "identity", "routers": [{"name": "topk", "k": 2}],
         "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
         "datasets": [{"name": "builtin:domains", "vocab_size": 300}]}


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_field_of_a_section_declares_whether_it_is_part_of_a_cells_identity(section):
    undecided = [name for name in section.model_fields if decision(section, name) is None]
    assert not undecided, (f"{section.__name__}: {', '.join(undecided)} declare no cell identity; annotate each "
                           "with CELL_KEY or NotCellKey(why) (workflows/study/identity.py)")


@pytest.mark.parametrize("path", sorted(COMMITTED))
def test_committed_studies_keep_their_cell_ids(path):
    study = load_study(REPO / path)
    assert [c.id for c in expand(study)] == COMMITTED[path]["cells"]
    assert [c.id for c in pretrained_cells(study)] == COMMITTED[path]["pretrained"]
    assert sorted(COMMITTED) == sorted(f"studies/{p.name}" for p in (REPO / "studies").glob("*.yaml"))


def one_cell(**changes):
    study = {**STUDY, **changes}
    (cell,) = expand(parse_study(study))
    return cell


@pytest.mark.parametrize("changes", [
    {"routers": [{"name": "topk", "k": 2, "label": "top-2"}]},
    {"routers": [{"name": "topk", "k": 2, "allow_non_causal": True}]},
    {"models": [{**STUDY["models"][0], "label": "small"}]},
    {"training": {"compile": True}},
    {"training": {"batching": "random"}},  # its default: the ids of cells from before the option existed
    {"training": {"fp16_initial_scale_power": 8}},  # exists only under fp16
    # router options added after cells existed, at their defaults
    {"routers": [{"name": "topk", "k": 2, "n_group": 1, "routed_scaling_factor": 1.0, "quantile_balancing": False}]},
    {"models": [{**STUDY["models"][0], "first_k_dense": 0}]},  # a model option added later, at its default
    {"resources": {"cpus_per_worker": 2, "max_concurrent_cells": 1, "max_failures": 3}},
], ids=lambda c: json.dumps(c)[:60])
def test_a_field_outside_the_identity_keeps_the_cell(changes):
    assert one_cell(**changes).id == one_cell().id


@pytest.mark.parametrize("changes", [
    {"routers": [{"name": "topk", "k": 1}]},
    {"routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}]},
    {"models": [{**STUDY["models"][0], "expert_hidden": 64}]},
    {"datasets": [{"name": "builtin:domains", "vocab_size": 512}]},
    {"seeds": [1]},
    {"training": {"lr": 1e-3}},
    {"training": {"batching": "by_domain"}},
    {"resources": {"workers_per_cell": 2}},
    {"routers": [{"name": "topk", "k": 2, "n_group": 2}]},
    {"routers": [{"name": "topk", "k": 2, "router_bias": True}]},
    {"models": [{**STUDY["models"][0], "first_k_dense": 1}]},
    {"models": [{**STUDY["models"][0], "moe_layer_pattern": [0, 1]}]},
], ids=lambda c: json.dumps(c)[:60])
def test_a_field_of_the_identity_makes_a_new_cell(changes):
    assert one_cell(**changes).id != one_cell().id


def test_the_loss_scale_is_part_of_an_fp16_cell():
    fp16 = one_cell().training.model_copy(update={"precision": "fp16"})
    base = replace(one_cell(), training=fp16)
    rescaled = replace(base, training=fp16.model_copy(update={"fp16_initial_scale_power": 8}))
    assert base.id != rescaled.id != one_cell().id


def test_a_field_without_a_declaration_counts_as_identity():
    class Section(BaseModel):
        declared_out: bool = False
        undeclared: int = 1

    Section.model_fields["declared_out"].metadata.append(NotCellKey("test"))
    section = Section(declared_out=True, undeclared=2)
    assert identity(section, section.model_dump()) == {"undeclared": 2}


def test_a_pretrained_baselines_id_hashes_its_evaluation_less_what_only_the_report_uses():
    summarization = SummarizationConfig(baseline="hash", samples=3, pretrained=[
        PretrainedBaseline(model="t5-small", label="T5")])
    cell = PretrainedCell(summarization.pretrained[0], DatasetEntry(name="builtin:method_names"), summarization)
    evaluation = summarization.model_dump(exclude={"baseline", "samples", "pretrained"})
    blob = json.dumps({"pretrained": cell.baseline.model_dump(exclude={"label"}), "dataset": cell.dataset.model_dump(),
                       "summarization": evaluation}, sort_keys=True)
    assert cell.id == "pt-" + hashlib.sha256(blob.encode()).hexdigest()[:9]  # the formula the ids were made with
    relabelled = PretrainedCell(summarization.pretrained[0].model_copy(update={"label": "t5"}), cell.dataset,
                                summarization.model_copy(update={"samples": 8, "baseline": None}))
    assert relabelled.id == cell.id
