"""Claims decided on hand-made MLflow runs (a real SQLite store) with known values: a clear effect is supported, its
opposite refuted, noise is inconclusive (with the detectable effect), a tie inside its margin equivalent, Holm's
correction across the study's claims changes a verdict, and a claim fixed by construction is refused."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from moe_eval.verdicts import minimum_detectable_effect
from workflows.report.claims import claim_rows, claims_report, verdicts
from workflows.report.pooled import pooled_rows, regime_verdicts
from workflows.study.cells import expand
from workflows.study.errors import StudyError
from workflows.study.loading import parse_study
from tests.workflows.test_pooled_report import store

SEEDS = [0, 1, 2, 3, 4]
STUDY = {
    "name": "claims", "seeds": SEEDS, "baseline": "topk(k=2)",
    "routers": [{"name": "topk", "k": 2}, {"name": "hash"}, {"name": "topk", "k": 1},
                {"name": "top_p", "p": 0.5, "max_k": 2}],
    "models": [{"name": "gpt", "num_experts": 4}],
    "datasets": [{"name": "builtin:domains"}],
}
rng = np.random.default_rng(0)
TOP2 = [5.00, 5.10, 4.95, 5.05, 5.02]
LOSSES = {
    "topk(k=2)": TOP2,
    "hash": [x + 0.10 + e for x, e in zip(TOP2, rng.normal(0, 0.01, 5))],  # clearly worse
    "topk(k=1)": [x + e for x, e in zip(TOP2, [0.2, -0.25, 0.15, -0.1, 0.05])],  # noise around top-2
    "top_p(max_k=2,p=0.5)": [x + e for x, e in zip(TOP2, [0.004, -0.003, 0.002, -0.004, 0.001])],  # a tie
}


def decided(tmp_path, claims: list[dict], losses=LOSSES) -> dict[str, object]:
    raw = {**copy.deepcopy(STUDY), "claims": claims}
    study = parse_study(raw)
    cells, runs = store(tmp_path, losses, raw)
    rows = claim_rows(study.claims, study.baseline, cells, runs, {})
    return {v.row.claim.name: v for v in verdicts(rows, regime_verdicts(cells, pooled_rows(cells, runs)))}


def claim(name, system, direction, **extra):
    return {"name": name, "metric": "eval/loss", "system": system, "direction": direction, **extra}


def test_supported_refuted_inconclusive_and_equivalent(tmp_path):
    results = decided(tmp_path, [
        claim("hash is worse", "hash", "greater", report="001"),
        claim("hash is better", "hash", "less"),
        claim("top-1 differs", "topk(k=1)", "less"),
        claim("top-p ties top-2", "top_p(max_k=2,p=0.5)", "equivalent", margin=0.02),
    ])
    assert results["hash is worse"].decision.verdict == "supported"
    assert results["hash is better"].decision.verdict == "refuted"
    noisy = results["top-1 differs"]
    assert noisy.decision.verdict == "inconclusive"  # never "a tie"
    diffs = noisy.row.diffs
    assert noisy.detectable == pytest.approx(minimum_detectable_effect(np.std(diffs, ddof=1), 5))
    assert noisy.detectable > abs(np.mean(diffs))
    assert noisy.seeds_needed is None or noisy.seeds_needed > 5  # None: more than 1,000 seeds
    assert results["top-p ties top-2"].decision.verdict == "equivalent"
    assert all(v.regime.startswith("unknown") for v in results.values())  # no dense baselines of two widths


def test_holm_across_the_claims_can_turn_a_verdict_inconclusive(tmp_path):
    # top-1 a little better than top-2: p ~ 0.04 alone; ranked third of five claims, Holm triples it
    losses = {**LOSSES, "topk(k=1)": [x - 0.02 + e for x, e in zip(TOP2, [0.02, -0.015, 0.01, -0.012, 0.0])]}
    alone = decided(tmp_path / "a", [claim("top-1 is better", "topk(k=1)", "less")], losses)
    assert alone["top-1 is better"].decision.verdict == "supported"
    many = decided(tmp_path / "b", [claim("top-1 is better", "topk(k=1)", "less"),
                                    *[claim(f"noise {i}", "top_p(max_k=2,p=0.5)", "less") for i in range(1)],
                                    claim("hash", "hash", "greater"),
                                    claim("hash vs top-1", "hash", "greater", against="topk(k=1)"),
                                    claim("top-p vs top-1", "top_p(max_k=2,p=0.5)", "greater", against="topk(k=1)")],
                   losses)
    raw = alone["top-1 is better"].row.deciding_p
    adjusted = many["top-1 is better"].decision.adjusted_p
    assert adjusted > raw and adjusted >= 0.05 > raw
    assert many["top-1 is better"].decision.verdict == "inconclusive"


def test_the_claims_table_names_its_test_and_both_p_values(tmp_path):
    raw = {**copy.deepcopy(STUDY), "claims": [claim("hash is worse", "hash", "greater", report="001")]}
    study = parse_study(raw)
    cells, runs = store(tmp_path, LOSSES, raw)
    text = claims_report(study.claims, study.baseline, cells, runs, pooled_rows(cells, runs), {})
    assert "| hash is worse | 001 | hash vs topk(k=2) on eval/loss (greater)" in text
    assert "| paired t |" in text and "| supported |" in text


@pytest.mark.parametrize("bad,message", [
    (claim("x", "hash", "less", metric="eval/moe/router_entropy_norm"), "fixed by construction"),
    (claim("x", "topk(k=1)", "less", metric="eval/moe/experts_per_token"), "same number of experts"),
    (claim("x", "top_p(max_k=2,p=0.5)", "greater", metric="eval/moe/experts_per_token_std", against="topk(k=1)"),
     "experts_per_token_std of topk(k=1) is fixed by construction"),
    (claim("x", "nope", "less"), "claims[0].system: 'nope' is not a router"),
    (claim("x", "hash", "equivalent"), "margin"),
    (claim("x", "hash", "less", test="bootstrap", metric="eval/moe/load_cv"), "bootstrap"),
    (claim("x", "hash", "less", metric="eval/los"), "not a metric moelab logs"),
    (claim("x", "topk(k=2)", "less"), "compared with itself"),
])
def test_a_bad_claim_is_refused_at_validation_naming_its_field(bad, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        parse_study({**copy.deepcopy(STUDY), "claims": [bad]})


def test_claims_do_not_change_the_cells():
    with_claims = parse_study({**copy.deepcopy(STUDY), "claims": [claim("hash is worse", "hash", "greater")]})
    assert [c.id for c in expand(with_claims)] == [c.id for c in expand(parse_study(copy.deepcopy(STUDY)))]


def test_replication_decides_each_claim_again_on_other_seeds_and_says_whether_it_stands(tmp_path):
    from workflows.report.pooled import pooled_rows
    from workflows.study.loading import with_seeds

    top2 = TOP2 + [5.03, 4.98, 5.07]
    hash_ = [x + 0.1 for x in top2]  # worse on every seed
    top1 = [x + e for x, e in zip(top2, [0.2, -0.25, 0.15, -0.1, 0.05, 0.3, -0.2, 0.1])]  # noise
    raw = {**copy.deepcopy(STUDY), "seeds": list(range(8)),
           "claims": [claim("hash is worse", "hash", "greater"), claim("top-1 is better", "topk(k=1)", "less")]}
    cells, runs = store(tmp_path, {"topk(k=2)": top2, "hash": hash_, "topk(k=1)": top1,
                                   "top_p(max_k=2,p=0.5)": top2}, raw)
    study = parse_study(raw)
    discovery, again = (expand(with_seeds(study, seeds)) for seeds in ("0,1,2,3,4", "5,6,7"))
    assert {c.id for c in discovery} | {c.id for c in again} == {c.id for c in cells}  # same cells, split by seed
    text = claims_report(study.claims, study.baseline, discovery, runs, pooled_rows(discovery, runs), {},
                         replication=(again, pooled_rows(again, runs)))
    hash_line = next(line for line in text.splitlines() if line.startswith("| hash is worse"))
    assert "| supported |" in hash_line and hash_line.count("supported") == 2 and "| yes |" in hash_line
    top1_line = next(line for line in text.splitlines() if line.startswith("| top-1 is better"))
    assert "| inconclusive |" in top1_line and "| no |" in top1_line
    unrun = expand(with_seeds(study, "8,9"))  # replication seeds with no runs: not decided, not "inconclusive"
    text = claims_report(study.claims, study.baseline, discovery, runs, pooled_rows(discovery, runs), {},
                         replication=(unrun, pooled_rows(unrun, runs)))
    hash_line = next(line for line in text.splitlines() if line.startswith("| hash is worse"))
    assert "| 0 | — | not run | — |" in hash_line and hash_line.count("supported") == 1


def test_seeds_on_the_command_line_must_be_integers(tmp_path):
    from workflows.study.loading import with_seeds

    study = parse_study(copy.deepcopy(STUDY))
    with pytest.raises(StudyError, match="--seeds: 'a,b' is not a comma-separated list of integers"):
        with_seeds(study, "a,b")
    with pytest.raises(StudyError, match="--seeds: 1 is listed more than once"):
        with_seeds(study, "1,1")


def test_matched_compute_interpolates_the_references_at_the_systems_experts_per_token(tmp_path):
    """top-p at ~1.5 experts/token against top-1 (1.0) and top-2 (2.0): the references' loss interpolated at each
    seed's measured experts/token stands in for `against`."""
    from mlflow.tracking import MlflowClient

    from workflows.report.claims import interpolate_at

    raw = {**copy.deepcopy(STUDY), "claims": [
        {"name": "top-p wins at matched compute", "metric": "eval/loss", "system": "top_p(max_k=2,p=0.5)",
         "direction": "less", "matched_compute": {"metric": "eval/moe/experts_per_token",
                                                  "references": ["topk(k=1)", "topk(k=2)"]}}]}
    study = parse_study(raw)
    cells = expand(study)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("claims", artifact_location=(tmp_path / "art").as_uri())
    experts = {"topk(k=1)": 1.0, "topk(k=2)": 2.0, "top_p(max_k=2,p=0.5)": 1.5, "hash": 1.0}
    runs, expected = {}, {}
    for cell in cells:
        router, s = cell.router.display(), cell.seed
        compute = experts[router] + (0.1 * (s - 2) if router.startswith("top_p") else 0.0)
        loss = {"topk(k=1)": TOP2[s] + 0.2, "topk(k=2)": TOP2[s], "hash": TOP2[s] + 0.1,
                "top_p(max_k=2,p=0.5)": TOP2[s] + 0.2 * (2 - compute) - 0.05 + 0.002 * (-1) ** s}[router]
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "eval/loss", loss)
        client.log_metric(run.info.run_id, "eval/moe/experts_per_token", compute)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[cell.id] = client.get_run(run.info.run_id)
        if router.startswith("top_p"):
            expected[s] = loss - interpolate_at(compute, [(1.0, TOP2[s] + 0.2), (2.0, TOP2[s])])
    (row,) = claim_rows(study.claims, study.baseline, cells, runs, {})
    assert row.diffs == pytest.approx([expected[s] for s in SEEDS])
    assert np.mean(row.diffs) == pytest.approx(-0.05, abs=0.002)
    (verdict,) = verdicts([row], [])
    assert verdict.decision.verdict == "supported" and "at equal eval/moe/experts_per_token" in row.against
    assert interpolate_at(2.5, [(1.0, 1.0), (2.0, 2.0)]) != interpolate_at(2.5, [(1.0, 1.0), (2.0, 2.0)])  # NaN


def test_a_matched_compute_claim_names_references_of_the_study():
    bad = {"name": "x", "metric": "eval/loss", "system": "top_p(max_k=2,p=0.5)", "direction": "less",
           "matched_compute": {"metric": "eval/moe/experts_per_token", "references": ["topk(k=1)", "top9"]}}
    with pytest.raises(StudyError, match=re.escape("claims[0].matched_compute.references: 'top9' is not a router")):
        parse_study({**copy.deepcopy(STUDY), "claims": [bad]})


def test_a_claim_can_compare_one_router_on_two_datasets(tmp_path):
    from mlflow.tracking import MlflowClient

    raw = {**copy.deepcopy(STUDY), "datasets": [{"name": "builtin:domains"}, {"name": "builtin:domains_natural"}],
           "claims": [{"name": "curated specializes more", "metric": "eval/moe/purity", "system": "topk(k=2)",
                       "dataset": "builtin:domains", "against_dataset": "builtin:domains_natural",
                       "direction": "greater"}]}
    study = parse_study(raw)
    cells = expand(study)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("claims", artifact_location=(tmp_path / "art").as_uri())
    runs = {}
    for cell in cells:
        run = client.create_run(experiment)
        curated = cell.dataset.name == "builtin:domains"
        client.log_metric(run.info.run_id, "eval/moe/purity", (0.6 if curated else 0.45) + 0.01 * cell.seed)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[cell.id] = client.get_run(run.info.run_id)
    (row,) = claim_rows(study.claims, study.baseline, cells, runs, {})
    assert row.diffs == pytest.approx([0.15] * 5) and row.against == "topk(k=2) on builtin:domains_natural"
    assert verdicts([row], [])[0].decision.verdict == "supported"
    with pytest.raises(StudyError, match="against_dataset"):
        parse_study({**raw, "claims": [{**raw["claims"][0], "dataset": None}]})


def test_a_claim_against_a_value_is_scipys_one_sample_t_test_over_the_seeds_that_define_it(tmp_path):
    """Report 003's "experts per token rise with difficulty" is about one router: its per-seed correlation against 0.
    A seed where the correlation is undefined (NaN: experts per token constant) pairs nothing."""
    from mlflow.tracking import MlflowClient
    from scipy import stats

    metric = "eval/moe/difficulty_entropy_corr"
    raw = {**copy.deepcopy(STUDY), "claims": [
        {"name": "top-p rises with difficulty", "metric": metric, "system": "top_p(max_k=2,p=0.5)",
         "against_value": 0, "direction": "greater"},
        {"name": "top-p rises by more than 0.3", "metric": metric, "system": "top_p(max_k=2,p=0.5)",
         "against_value": 0.3, "direction": "greater"}]}
    study = parse_study(raw)
    cells = expand(study)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("claims", artifact_location=(tmp_path / "art").as_uri())
    correlations = [0.31, 0.22, 0.40, 0.27, float("nan")]
    runs = {}
    for cell in cells:
        run = client.create_run(experiment)
        if cell.router.display().startswith("top_p"):
            client.log_metric(run.info.run_id, metric, correlations[cell.seed])
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[cell.id] = client.get_run(run.info.run_id)
    above_zero, above_third = claim_rows(study.claims, study.baseline, cells, runs, {})
    defined = correlations[:4]
    assert above_zero.diffs == pytest.approx(defined) and above_zero.against == "0"
    assert above_zero.t_p == pytest.approx(stats.ttest_1samp(defined, 0.0).pvalue)
    assert above_third.diffs == pytest.approx([c - 0.3 for c in defined])
    assert above_third.t_p == pytest.approx(stats.ttest_1samp(defined, 0.3).pvalue)
    assert above_zero.bootstrap is None
    first, second = verdicts([above_zero, above_third], [])
    assert first.decision.verdict == "supported" and second.decision.verdict == "inconclusive"
    text = claims_report(study.claims, study.baseline, cells, runs, pooled_rows(cells, runs), {})
    assert f"| top_p(max_k=2,p=0.5) vs 0 on {metric} (greater)" in text


@pytest.mark.parametrize("extra,message", [
    ({"against": "hash"}, "against_value: the system is compared with this value alone"),
    ({"test": "bootstrap", "metric": "eval/loss"}, "decided over seeds (paired_t, one sample)"),
    ({"system": "topk(k=1)"}, "difficulty_entropy_corr of topk(k=1) is fixed by construction"),
])
def test_a_bad_claim_against_a_value_is_refused_naming_its_field(extra, message):
    bad = {"name": "x", "metric": "eval/moe/difficulty_entropy_corr", "system": "top_p(max_k=2,p=0.5)",
           "against_value": 0, "direction": "greater", **extra}
    with pytest.raises(StudyError, match=re.escape(message)):
        parse_study({**copy.deepcopy(STUDY), "claims": [bad]})


def test_the_findings_page_is_the_studies_claims_tables(tmp_path, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from workflows.driver.cli import main

    raw = {**copy.deepcopy(STUDY), "description": "hash against top-2",
           "claims": [claim("hash is worse", "hash", "greater", report="001")]}
    cells, runs = store(tmp_path, LOSSES, raw)  # the runs, in <tmp_path>/mlflow.db: tmp_path is the workdir
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for cell in cells:  # tagged as moelab tags its cell runs, so the read-back finds them
        client.set_tag(runs[cell.id].info.run_id, "moelab.role", "cell")
        client.set_tag(runs[cell.id].info.run_id, "moelab.cell_id", cell.id)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "other.yaml"
    elsewhere.write_text(yaml.safe_dump({**raw, "name": "other"}))
    page = tmp_path / "findings.md"
    empty = tmp_path / "empty-workdir"  # searched first: the study is read from the first workdir where it ran
    (empty / "mlflow.db").parent.mkdir()
    assert main(["findings", str(path), str(elsewhere), "--workdir", str(empty), "--workdir", str(tmp_path),
                 "--out", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Findings") and "## claims\n\nhash against top-2." in text
    assert "| hash is worse | 001 |" in text and "| supported |" in text
    assert "## other" in text and f"Not run in {empty}, {tmp_path}" in text  # a study without runs says so
    assert "cells have finished" not in text
    client.set_terminated(runs[cells[0].id].info.run_id, "RUNNING")  # a study still running says how far it got
    assert main(["findings", str(path), "--workdir", str(tmp_path), "--out", str(page)]) == 0
    assert f"**{len(cells) - 1} of its {len(cells)} cells have finished**" in page.read_text()
    client.set_terminated(runs[cells[0].id].info.run_id, "FINISHED")
    pages = tmp_path / "pages"
    assert main(["findings", str(path), str(elsewhere), "--workdir", str(tmp_path), "--out-dir", str(pages)]) == 0
    page = (pages / "claims.md").read_text()
    assert page.startswith(f"# claims\n\nGenerated on ") and f"`moelab findings {path} --workdir {tmp_path}`" in page
    assert "| hash is worse | 001 |" in page and not (pages / "other.md").exists()
    assert "| `" + str(elsewhere) + "` | not run yet |" in (pages / "index.md").read_text()
    (pages / "other.md").write_text("# other\n\nan earlier run's page\n")  # kept, and linked, when it did not run
    assert main(["findings", str(path), str(elsewhere), "--workdir", str(tmp_path), "--out-dir", str(pages)]) == 0
    assert (pages / "other.md").read_text() == "# other\n\nan earlier run's page\n"
    assert "[other](other.md)" in (pages / "index.md").read_text()
    assert main(["findings", str(path), "--workdir", str(tmp_path), "--out-dir", str(pages)]) == 0  # one page again
    rows = [line for line in (pages / "index.md").read_text().splitlines() if line.startswith("| `")]
    assert rows == [f"| `{path}` | [claims](claims.md) |", f"| `{elsewhere}` | [other](other.md) |"]  # both, in order
