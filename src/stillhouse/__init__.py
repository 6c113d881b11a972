"""stillhouse: the LLM distillation pathway and the blocking of it, each measured against the other.

Layout: ``teacher/`` is the shared core (one Teacher protocol); ``distill/`` harvests,
curates, trains and evaluates; ``guard/`` is the gateway that logs, detects and enforces;
``arena/`` runs campaigns through the guard and measures the contest. ``cli.py`` is thin.
"""

__version__ = "0.1.0"
