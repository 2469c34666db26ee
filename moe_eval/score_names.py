"""The names of the per-document summary scores (logged as test/<name>): importable without numpy, so validating a
study's claims stays light."""

BLEU = "bleu"
MEAN_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1", "bertscore_precision",
                "bertscore_recall", "coverage", "density", "compression", "bigram_overlap", "summary_words",
                "repetition")
