"""Experiments built from training runs: the ablation (arms x seeds) and its report."""
