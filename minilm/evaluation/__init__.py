"""Evaluation: the shared scorer (scoring), calibration and the temperature fit, one pass of the
scorer over documents feeding sinks (corpus), the documents to score, the reports and per-token
views, and evaluate_checkpoint (run) that puts them together."""
