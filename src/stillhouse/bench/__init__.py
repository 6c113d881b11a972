"""Benchmarks: us and named peers side by side, in one run, on the same inputs, as ratios.

Not a floor of the product: nothing under ``stillhouse`` imports from here but the CLI.
"""
