"""Ground floor of provenance: watermark keys, the guard-to-server channel, and keyed green lists.

- :mod:`.keys`  keys derived from one secret (HMAC-SHA256), key ids, epochs, and the
                authenticated ``X-Stillhouse-Watermark`` header the guard sets and ``serve`` checks;
- :mod:`.green` the KGW green-list maths (a keyed PRF over a context window and a token) and
                the per-row processor that biases a row's logits toward its key's green list.

Stdlib and numpy only (torch where a processor touches logits), so ``serve``, the guard and
``provenance`` all import it from below.
"""
