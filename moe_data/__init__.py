"""Datasets for moelab: offline built-ins, hub and local files; BPE tokenizer; prepared token tensors."""
