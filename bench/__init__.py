"""Benchmarks: the scheduling policies, FastServe against its peers, and the micro-benchmarks.

Each script runs from the repository root as a module, e.g. `python -m bench.policies`; see
bench/README.md.
"""
