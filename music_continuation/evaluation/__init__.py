"""Evaluation: the scores and their baselines, listening metrics, the listening page, plots, evaluate and inference."""
