"""Benchmarks of what the bot adds around the model, on loopback: ``python -m bench [--quick]``."""
