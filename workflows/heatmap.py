"""Expert-usage heatmap (MoE layers x experts, fraction of routes) as a PNG artifact."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def expert_usage_heatmap(fractions: dict[int, list[float]], title: str, path: Path) -> Path:
    layers = sorted(fractions)
    matrix = [fractions[i] for i in layers]
    num_experts = len(matrix[0])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * num_experts, 1.0 + 0.5 * len(layers)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(layers)), [f"block {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    for r, row in enumerate(matrix):
        for e, value in enumerate(row):
            ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="fraction of routes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
