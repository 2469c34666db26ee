"""Corpus BLEU (Papineni et al. 2002) through `sacrebleu` (Post 2018), as a local `evaluate` module.

Returns the score, sacrebleu's signature (report it with the number), and each example's n-gram statistics, so a
corpus-level score can be recomputed on bootstrap resamples by sacrebleu itself.
"""
import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = "sacreBLEU corpus score with its signature; one reference per prediction."
_KWARGS = "predictions: list of str; references: list of str; tokenize (default 13a); lowercase"


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
        score = bleu.corpus_score(predictions, [references])
        stats = bleu._extract_corpus_statistics(predictions, [references])  # per example: lengths, n-gram counts
        return {"score": score.score, "signature": str(bleu.get_signature()), "precisions": score.precisions,
                "bp": score.bp, "sys_len": score.sys_len, "ref_len": score.ref_len, "stats": stats}
