"""Heatmaps as PNG artifacts: expert usage (MoE blocks x experts) and domain specialization (domains x experts)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def expert_usage_heatmap(fractions: dict[int, list[float]], title: str, path: Path) -> Path:
    layers = sorted(fractions)
    return heatmap([fractions[i] for i in layers], [f"block {i}" for i in layers], title, "fraction of routes", path)


def heatmap(matrix: list[list[float]], row_labels: list[str], title: str, value_label: str, path: Path) -> Path:
    """Rows x experts, each cell annotated with its value."""
    num_experts = len(matrix[0])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * num_experts, 1.0 + 0.5 * len(row_labels)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    for r, row in enumerate(matrix):
        for e, value in enumerate(row):
            ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label=value_label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
