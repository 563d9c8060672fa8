"""Wiring, entry points, checkpoints, evaluation."""
