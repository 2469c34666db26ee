"""What runs in `moelab`'s own process: the CLI, and the runner that turns a study into prepared data, MLflow runs
and one Ray Train run per cell."""
