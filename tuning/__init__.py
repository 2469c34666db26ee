"""Ray Tune sweeps over routing knobs (alpha, k, p, thresholds). Trials reuse workflows.cell.train_cell.train_cell."""
