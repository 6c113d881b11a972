"""Provenance: does this text, or this model, carry one of our watermark keys, and whose?

- :mod:`.stats`       exact binomial tails and family-wise corrections (plain functions);
- :mod:`.detect`      scoring token sequences against candidate keys (deduplicated tuples);
- :mod:`.candidates`  which keys to try: key ids from a guard log or given, derived from the secret;
- :mod:`.texts`       text from a file, a JSONL dataset or a harvest run;
- :mod:`.radioactive` the radioactivity test on a suspect model (open-weight and closed);
- :mod:`.commands`    ``stillhouse provenance text|model``.

It sits above ``teacher/`` beside ``distill/`` and ``guard/``; the key derivation and green lists
it shares with ``serve`` and the guard live on the ground floor (:mod:`stillhouse.watermark`).
"""
