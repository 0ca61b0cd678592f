"""Training: the run config, data on memmaps, the loop (DDP), fine-tuning sources and tracking."""
