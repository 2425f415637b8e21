"""Adversarial training: the multi-scale STFT discriminator, its losses, and its training step."""
