"""Tensor parallelism: one model sharded over several devices (see runner.py for the design)."""
