"""Training: the launcher (settings, processes), the worker (one rank's loop), checkpoints, MLflow logging."""
