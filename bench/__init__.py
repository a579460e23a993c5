"""Benchmarks (scripts, not tests): `python -m bench overhead`, `python -m bench all`."""
