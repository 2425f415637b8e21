"""Optimisation helpers beyond the optimiser itself (the EMA of the weights)."""
