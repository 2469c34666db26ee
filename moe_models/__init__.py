"""moelab's models: plain PyTorch + deepspeed.moe primitives. Imports neither Ray nor MLflow."""
