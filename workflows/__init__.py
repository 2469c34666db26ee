"""Framework plumbing: study file -> cells -> Ray Train/DeepSpeed -> MLflow -> comparison tables."""
