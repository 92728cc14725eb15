"""The benchmark runner (``python benchmarks/run.py``): one module per benchmark, sharing :mod:`benchmarks.harness`.

See ``benchmarks/README.md`` for what each benchmark measures and how.
"""
