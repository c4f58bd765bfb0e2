"""Benchmarks: one file per family over one scoring core (scoring.py), plus the report writer."""
from benchmarks import aro, retrieval, sugarcrepe, syn  # noqa: F401  (each import registers its benchmarks)
from benchmarks.base import BENCHMARKS, BenchContext, BenchResult

__all__ = ["BENCHMARKS", "BenchContext", "BenchResult"]
