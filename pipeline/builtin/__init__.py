"""Embedded defaults: the demo data generator and the tiny-model recipes (no network needed)."""
