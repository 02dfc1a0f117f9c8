"""The training engine: one loop, checkpoints, evaluation, optimiser settings."""
