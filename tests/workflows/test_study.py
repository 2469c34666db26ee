"""Study-file validation: every class of bad input fails before launch, naming the field and allowed values."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_models.routers import ROUTERS
from workflows.driver.cli import main
from workflows.study.cells import expand
from workflows.study.loading import parse_study

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
    "groups that do not split the experts": (
        lambda s: s["routers"].append({"name": "topk", "k": 2, "n_group": 3, "label": "grouped"}),
        ["routers[3].n_group: 3 groups do not split 4 experts evenly (models[0].num_experts=4)"]),
    "quantile balancing beside the sign step": (
        lambda s: s["routers"][0].update(quantile_balancing=True, expert_bias_rate=0.01),
        ["routers[0]", "quantile_balancing solves the selection bias that expert_bias_rate steps"]),
    "dense router gradient with token dropping": (
        lambda s: s["routers"][0].update(dense_gradient=True, capacity_factor=1.0),
        ["routers[0].dense_gradient: the dense router gradient runs every expert on every token"]),
    "a router for a dense block": (
        lambda s: s["models"][0].update(n_layers=3, first_k_dense=1, layer_routers={0: {"name": "hash"}}),
        ["models[0]: layer_routers: block 0 is not an MoE block of this model (blocks [1, 2] are)"]),
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
                             ["datasets[0].name", "matches no file"]),
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
    # Meaningless values pydantic's lax mode would take
    "infinite lr": (lambda s: s.update(training={"lr": float("inf")}), ["training.lr", "finite number"]),
    "infinite alpha": (lambda s: s["routers"][0]["balancing"].update(switch_lbl=float("inf")),
                       ["routers[0].balancing.switch_lbl", "finite number"]),
    "infinite capacity": (lambda s: s["routers"][0].update(capacity_factor=float("inf")),
                          ["routers[0].capacity_factor", "finite number"]),
    "NaN router option": (lambda s: s["routers"][0].update(jitter=float("nan")), ["routers[0].jitter", "finite"]),
    "adam betas outside [0, 1)": (lambda s: s.update(training={"adam_betas": [2, -1]}),
                                  ["training.adam_betas[0]", "less than 1", "training.adam_betas[1]"]),
    "boolean steps": (lambda s: s.update(training={"steps": True}), ["training.steps", "a boolean (True)"]),
    "boolean router option": (lambda s: s["routers"][0].update(k=True), ["routers[0].k", "a boolean"]),
    "warmup longer than training": (lambda s: s.update(training={"steps": 20, "warmup_steps": 30}),
                                    ["training", "warmup_steps: 30 is more than steps=20"]),
    "empty choice": (lambda s: s.update(sweep={"name": "s", "space": {"k": {"choice": []}}}),
                     ["sweep.space.k", "choice: needs at least one value"]),
    "sweep path through a value": (lambda s: s.update(sweep={"name": "s", "space": {"k.x": {"choice": [1]}}}),
                                   ["sweep.space.k.x", "'k.x' is not a path into this router"]),
    # found by the fuzz test: a key that is not a path of identifiers is quoted, so the line still names one field
    "sweep key not a field path": (lambda s: s.update(sweep={"name": "s", "space": {"0k": {"choice": [1]}}}),
                                   ["sweep.space.'0k': value 1 is invalid for router"]),
    "no MoE block": (lambda s: s["models"][0].update(moe_every=0),
                     ["models[0].moe_every", "without an MoE block", "routers[0] (topk(k=2)) routes"]),
    "MoE every 3rd of 2 layers": (lambda s: s["models"][0].update(moe_every=3, n_layers=2),
                                  ["models[0].moe_every: 3 leaves gpt without an MoE block"]),
    "a million workers": (lambda s: s.update(resources={"workers_per_cell": 1_000_000}),
                          ["resources.workers_per_cell", "less than or equal to 4096"]),
    "unplaceable CPUs": (lambda s: s.update(resources={"cpus_per_worker": 1e-300}),
                         ["resources.cpus_per_worker", "greater than or equal to 0.0001"]),
    "unplaceable GPUs": (lambda s: s.update(resources={"gpus_per_worker": 1e-9}),
                         ["resources.gpus_per_worker", "resource granularity"]),
    "name that is a path": (lambda s: s.update(name=".."), ["name: String should match pattern"]),
    "name with a slash": (lambda s: s.update(name="a/b"), ["name: String should match pattern"]),
    "prompt without its slot": (lambda s: s.update(summarization={"pretrained": [{"model": "t5", "prompt": "x"}]}),
                                ["summarization.pretrained[0].prompt", "must contain {document}"]),
    "prompt with another slot": (lambda s: s.update(summarization={"pretrained": [
                                     {"model": "t5", "prompt": "{document} {title}"}]}),
                                 ["summarization.pretrained[0].prompt", "no other placeholder", "{title}"]),
    "prompt with a lone brace": (lambda s: s.update(summarization={"pretrained": [
                                     {"model": "t5", "prompt": "{document} }"}]}),
                                 ["summarization.pretrained[0].prompt", "not a valid template"]),
    "pretrained path of an unknown user": (lambda s: s.update(summarization={"pretrained": [
                                               {"model": "~nosuchuser_moelab/x"}]}),
                                           ["summarization.pretrained[0].model", "no such folder"]),
    "pretrained path too long": (lambda s: s.update(summarization={"pretrained": [{"model": "/" + "a" * 300}]}),
                                 ["summarization.pretrained[0].model", "no such folder"]),
    "dataset path too long": (lambda s: s.update(datasets=[{"name": f"file:/tmp/{'a' * 300}.jsonl"}]),
                              ["datasets[0].name", "name too long"]),
    # Duplicate cells: the same id twice
    "repeated seed": (lambda s: s.update(seeds=[0, 0]), ["seeds: 0 is listed more than once"]),
    "repeated model": (lambda s: s["models"].append({"name": "gpt", "num_experts": 4, "label": "again"}),
                       ["models[1]: trains the same as models[0]"]),
    "two models of one name": (lambda s: s["models"].append({"name": "gpt", "num_experts": 8}),
                               ["models: two entries display as 'gpt'", "distinct `label`s"]),
    "repeated dataset": (lambda s: s["datasets"].append({"name": "builtin:domains"}),
                         ["datasets[1]: trains the same as datasets[0]"]),
    "routers equal but for their label": (lambda s: s["routers"].append({"name": "hash", "k": 1, "label": "h2"}),
                                          ["routers[3]: trains the same as routers[1] (labels aside)"]),
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
    proc = subprocess.run([sys.executable, "-m", "workflows.driver.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "seeds[0]" in proc.stderr


def test_quickstart_study_is_valid():
    from workflows.study.loading import load_study

    assert len(expand(load_study(REPO / "studies" / "quickstart.yaml"))) == 5


def test_summarization_study_expands_to_evaluated_cells_whose_ids_ignore_presentation():
    from workflows.study.loading import load_study

    study = load_study(REPO / "studies" / "summarization.yaml")
    cells = expand(study)
    assert len(cells) == 5 * len(study.seeds) and all(c.summarization == study.summarization for c in cells)
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


def write_and_validate(tmp_path, capsys, text: str | bytes) -> tuple[int, str]:
    path = tmp_path / "study.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        code = main(["validate", str(path)])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


TEXTUAL = {
    "Latin-1 bytes": ("description: caf\xe9\n".encode("latin-1") + yaml.safe_dump(GOOD).encode(),
                      ["not UTF-8 text: byte 0xe9 at offset 16 (line 1)"]),
    "nested hundreds deep": ("name: " + "[" * 600 + "]" * 600 + "\n", ["study: nested 601 levels deep", "at most 64"]),
    "nested by aliases": ("a: &a [1]\n" + "".join(f"a{i}: &a{i} [*{'a' if i == 0 else f'a{i - 1}'}]\n"
                                                   for i in range(3000)) + "name: *a2999\n",
                          ["unknown key (not allowed here)", "name: Input should be a valid string", " more"]),  # 3000 levels via aliases
    "duplicate key": (yaml.safe_dump(GOOD) + "name: other\n", ["key 'name' appears twice", "keep one"]),
    "duplicate nested key": ("name: t\nrouters: [{name: topk, k: 1, k: 2}]\nmodels: [{name: gpt}]\n"
                             "datasets: [{name: 'builtin:domains'}]\n", ["key 'k' appears twice"]),
}


@pytest.mark.parametrize("case", TEXTUAL, ids=list(TEXTUAL))
def test_textual_damage_is_a_field_named_error(case, tmp_path, capsys):
    text, expected = TEXTUAL[case]
    code, err = write_and_validate(tmp_path, capsys, text)
    assert code == 2, err
    assert "Traceback" not in err and len(err) < 2000
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_an_alias_bomb_in_a_sweep_prints_a_bounded_message(tmp_path, capsys):
    """A 9^5-element list from a few hundred bytes of YAML aliases: the message names the field, briefly."""
    bomb = "&a0 [x, x, x, x, x, x, x, x, x]"
    for i in range(1, 6):  # each level: the previous one, then 8 more references to it
        bomb = f"&a{i} [{bomb}, {', '.join([f'*a{i - 1}'] * 8)}]"
    text = yaml.safe_dump(GOOD) + f"sweep: {{name: s, space: {{k: {{choice: [{bomb}, *a5]}}}}}}\n"
    assert len(text) < 1000
    code, err = write_and_validate(tmp_path, capsys, text)
    assert code == 2 and "sweep.space.k" in err and len(err) < 3000, err[:3000]


def test_intervals_past_the_last_step_validate_with_a_warning(tmp_path, capsys):
    study = mutate(lambda s: s.update(training={"steps": 20, "eval_interval": 50, "checkpoint_interval": 50}))
    code, err = write_and_validate(tmp_path, capsys, yaml.safe_dump(study))
    assert code == 0
    assert "warning: training.eval_interval: 50 is more than steps=20" in err
    assert "warning: training.checkpoint_interval: 50 is more than steps=20" in err


@pytest.mark.parametrize("path", sorted((REPO / "studies" / "reports").glob("*.yaml")), ids=lambda p: p.name)
def test_each_reports_own_setup_validates_offline_naming_the_checks_it_skipped(path, capsys):
    """The four reports at their own size (hub checkpoints and datasets, GPUs): everything but the hub is checked."""
    code = main(["validate", "--no-hub", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "valid —" in out
    hub_models = [m for m in yaml.safe_load(path.read_text())["models"] if m["name"] == "hf"]
    assert err.count("skipped (needs the hub): models[") == len(hub_models)


def test_without_no_hub_a_checkpoint_the_hub_must_answer_for_is_a_problem(tmp_path, capsys, monkeypatch):
    from moe_models.pretrained import source

    monkeypatch.setattr(source, "hub_reachable", lambda timeout_s=3.0: False)  # this machine has no network anyway
    study = REPO / "studies" / "reports" / "003_dynamic_routing_gpt2.yaml"
    code, err = validate(tmp_path, capsys, yaml.safe_load(study.read_text()))
    assert code == 2 and "openai-community/gpt2-medium' is not a local folder, not in the Hugging Face cache" in err


def test_variants_of_one_router_are_named_by_what_sets_them_apart():
    """Balancing variants of one router would share a generated name (names are made of options): each gets the
    entry fields where they differ, a labeled router keeps its label, and the names touch no cell's identity."""
    variants = [{"name": "topk", "k": 2},
                {"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}},
                {"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}, "balancing_scope": "global_batch"},
                {"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}, "capacity_factor": 1.0, "label": "drop"},
                {"name": "hash"}]
    study = parse_study({**GOOD, "routers": variants, "baseline": "topk(k=2)+switch_lbl=0.01"})
    assert [r.display() for r in study.routers] == [
        "topk(k=2)", "topk(k=2)+switch_lbl=0.01", "topk(k=2)+switch_lbl=0.01+balancing_scope=global_batch", "drop",
        "hash"]
    labeled = parse_study({**GOOD, "routers": [{**r, "label": r.get("label", f"r{i}")} for i, r in enumerate(variants)]})
    assert [c.id for c in expand(study)] == [c.id for c in expand(labeled)]
