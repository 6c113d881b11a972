"""Fakes for tests, benchmarks and demos: a fast fake OpenAI-compatible server with scheduled faults.

Not a floor of the product: the product path never depends on it.
"""
