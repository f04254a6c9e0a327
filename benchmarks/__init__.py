"""resnet_bk benchmark suite: ``python -m benchmarks.run`` (or ``bash run.sh bench``).

Every op and module benchmark is a registered case (``benchmarks.cases``); timing, memory and
bandwidth measurement live in ``benchmarks.timing``; tables, JSON, Markdown, plots and
run-to-run comparison in ``benchmarks.report``. ``benchmarks/test_bench_ops.py`` exposes the same
op cases to pytest-benchmark (``python -m pytest benchmarks/ --benchmark-only``).
"""
