"""Pretrained Hugging Face checkpoints in the loop: where a checkpoint comes from (source.py), what it is
(architecture.py), and the module surgery that puts our MoE layer into it: router swap for MoE checkpoints
(router_swap.py), upcycling for dense ones (upcycle.py); plus the export of moelab's own models to the Hugging Face
format (export.py), so a finished cell can be the pretrained source of another."""
