"""Synthetic runs with hand-computable signals, one module per scoring stage."""
