"""Evaluation: the shared scorer, calibration and the temperature fit, the documents to score, the
reports and per-token views, and evaluate_checkpoint that runs them."""
