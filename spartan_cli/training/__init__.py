"""Post-training: the GECO multiplier, the trainer, runs with their checkpoints and presets, and more than one process."""
