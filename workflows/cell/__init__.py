"""What runs inside a Ray worker: one cell's training (`train_cell`, the Ray Train per-worker function) with the
jobs it calls, and the evaluation-only pretrained baselines. Never imports the driver or the report."""
