"""Study-file validation: every class of bad input fails before launch, naming the field and allowed values."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_models.routers import ROUTERS
from workflows.cells import expand
from workflows.cli import main
from workflows.study import parse_study

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "name": "t",
    "routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}, {"name": "hash"}, {"name": "dense"}],
    "models": [{"name": "gpt", "num_experts": 4}],
    "datasets": [{"name": "builtin:domains"}],
}


def validate(tmp_path, capsys, study) -> tuple[int, str]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    return exit_info.value.code, capsys.readouterr().err


def mutate(fn):
    study = copy.deepcopy(GOOD)
    fn(study)
    return study


BAD = {
    "unknown router": (lambda s: s["routers"].append({"name": "topz"}),
                       ["routers[3].name", "unknown router 'topz'",
                        "valid: " + ", ".join(sorted(ROUTERS.names()) + ["dense"])]),
    "k > experts": (lambda s: s["routers"].append({"name": "topk", "k": 5, "label": "big"}),
                    ["routers[3]", "5 experts per token", "at most models[0].num_experts=4"]),
    "negative alpha": (lambda s: s["routers"][0]["balancing"].update(switch_lbl=-0.1),
                       ["routers[0].balancing.switch_lbl", "greater than or equal to 0"]),
    "unknown balancing": (lambda s: s["routers"][0]["balancing"].update(lbl=0.1),
                          ["routers[0].balancing", "unknown balancing loss 'lbl'",
                           "valid: sequence_lbl, squared_usage, switch_lbl, z_loss"]),
    "unknown top-level key": (lambda s: s.update(epochs=3), ["epochs: unknown key"]),
    "unknown router option": (lambda s: s["routers"][0].update(top_k=2), ["routers[0].top_k: unknown key"]),
    "unknown training key": (lambda s: s.update(training={"stepz": 3}), ["training.stepz: unknown key"]),
    "missing datasets": (lambda s: s.pop("datasets"), ["datasets: Field required"]),
    "missing dataset file": (lambda s: s.update(datasets=[{"name": "file:/nope/x.jsonl"}]),
                             ["datasets[0].name", "does not exist"]),
    "bad schedule": (lambda s: s.update(training={"schedule": "cosin"}),
                     ["training.schedule", "'cosine', 'linear' or 'constant'"]),
    "non-causal router in a decoder": (lambda s: s["routers"].append({"name": "expert_choice"}),
                                       ["routers[3].allow_non_causal", "expert_choice is non-causal",
                                        "models[0] (gpt) is autoregressive"]),
    "ep_size vs workers": (lambda s: s["models"][0].update(ep_size=2), ["models[0].ep_size", "workers_per_cell=1"]),
    "summarization data for a decoder LM": (lambda s: s["datasets"].append({"name": "builtin:docstrings"}),
                                            ["datasets[1].name", "builtin:docstrings is a summarization dataset",
                                             "models[0] (gpt) trains on lm data", "valid model families: seq2seq"]),
    "unknown summarization baseline": (lambda s: s.update(summarization={"baseline": "top2"}),
                                       ["summarization.baseline", "'top2' is not a router", "valid: topk(k=2)"]),
    "bad generation setting": (lambda s: s.update(summarization={"num_beams": 0}),
                               ["summarization.num_beams", "greater than 0"]),
    "fp16 on CPU workers": (lambda s: s.update(training={"precision": "fp16", "zero_stage": 1}),
                            ["training.precision: fp16 needs GPU workers"]),
    "fp16 at ZeRO stage 0": (lambda s: s.update(training={"precision": "fp16"}, resources={"gpus_per_worker": 1}),
                             ["training.zero_stage: fp16 needs ZeRO stage 1 or 2", "DeepSpeed#8393"]),
    "unknown precision": (lambda s: s.update(training={"precision": "fp8"}),
                          ["training.precision", "'fp32', 'bf16' or 'fp16'"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_validate_rejects_bad_input_with_exit_2_and_field_name(case, tmp_path, capsys):
    change, expected = BAD[case]
    code, err = validate(tmp_path, capsys, mutate(change))
    assert code == 2
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_non_causal_router_runs_in_a_decoder_only_when_the_study_allows_it(tmp_path, capsys):
    allowed = mutate(lambda s: s["routers"].append({"name": "expert_choice", "allow_non_causal": True}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(allowed))
    assert main(["validate", str(path)]) == 0


def test_validate_accepts_good_study(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(path)]) == 0
    assert "3 cells" in capsys.readouterr().out


def test_missing_study_file_and_bad_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path / "none.yaml")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("routers: [unclosed")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(bad)])
    assert e.value.code == 2 and "not valid YAML" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(mutate(lambda s: s.update(seeds=[-1]))))
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "seeds[0]" in proc.stderr


def test_quickstart_study_is_valid():
    from workflows.study import load_study

    assert len(expand(load_study(REPO / "studies" / "quickstart.yaml"))) == 4


def test_summarization_study_expands_to_evaluated_cells_whose_ids_ignore_presentation():
    from workflows.study import load_study

    study = load_study(REPO / "studies" / "summarization.yaml")
    cells = expand(study)
    assert len(cells) == 12 and all(c.summarization == study.summarization for c in cells)
    assert all(c.training.adam_betas == (0.9, 0.98) and c.training.adam_eps == 1e-9 for c in cells)
    data = yaml.safe_load((REPO / "studies" / "summarization.yaml").read_text())
    data["summarization"]["baseline"] = "hash"  # a presentation choice: same cells
    assert [c.id for c in expand(parse_study(data))] == [c.id for c in cells]
    data["summarization"]["num_beams"] = 2  # decoding changes the result: new cells
    assert not {c.id for c in expand(parse_study(data))} & {c.id for c in cells}
    assert all(c.summarization is None for c in expand(parse_study(GOOD)))  # LM cells carry no decoding config


def test_cell_ids_are_stable_and_track_what_is_trained():
    ids = [c.id for c in expand(parse_study(GOOD))]
    assert ids == [c.id for c in expand(parse_study(copy.deepcopy(GOOD)))]
    assert len(set(ids)) == 3
    relabelled = mutate(lambda s: s["routers"][1].update(label="hash routing"))
    assert [c.id for c in expand(parse_study(relabelled))] == ids  # a display name is not a new cell
    explicit_default = mutate(lambda s: s["routers"][0].update(score="softmax"))
    assert [c.id for c in expand(parse_study(explicit_default))] == ids  # defaults are resolved before hashing
    new_lr = mutate(lambda s: s.update(training={"lr": 0.01}))
    assert not set(c.id for c in expand(parse_study(new_lr))) & set(ids)
    compiled = mutate(lambda s: s.update(training={**s.get("training", {}), "compile": True}))
    assert [c.id for c in expand(parse_study(compiled))] == ids  # how a cell runs, not what it trains
    unused_scale = mutate(lambda s: s.update(training={"fp16_initial_scale_power": 8}))
    assert [c.id for c in expand(parse_study(unused_scale))] == ids  # a loss scale only fp16 would use

    def fp16_ids(**training) -> list[str]:
        study = mutate(lambda s: s.update(training={"precision": "fp16", "zero_stage": 1, **training},
                                          resources={"gpus_per_worker": 1}))
        return [c.id for c in expand(parse_study(study))]

    assert fp16_ids() != fp16_ids(fp16_initial_scale_power=8)  # ... which it does
