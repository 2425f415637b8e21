"""Blind listening tests (MUSHRA) across an ablation study's cells: render, serve, rate, report."""
