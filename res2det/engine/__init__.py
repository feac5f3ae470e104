"""Training: typed configs (``train_config``), the trainer and its checkpoints, the training step, schedules and
distributed set-up."""
