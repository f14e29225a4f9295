"""Reproducible benchmarks: `make bench` (or `python -m benchmarks [name ...]`).

Each benchmark measures Refinery's path beside a baseline in the same run and writes a
Markdown table with the machine it ran on to benchmarks/results/<name>.md.
"""
