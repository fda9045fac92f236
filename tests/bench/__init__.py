"""Benchmarks: ``python -m tests.bench`` runs them all; each prints one JSON object per line."""
