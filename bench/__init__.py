"""Benchmarks and the chaos run; run them as modules from the repository root
(`.venv/bin/python -m bench.reconcile`): they import the shared testing kit, tests.support."""
