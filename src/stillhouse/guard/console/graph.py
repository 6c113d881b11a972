"""A cluster drawn as a graph: accounts on an outer ring, the things they share on an inner one.

Each shared item (a client IP, a subnet, a user agent with its header fingerprint, a payment
fingerprint) is a hub node, joined to every member seen with it, so a link between two accounts
reads as the path account - what they share - account, and a cluster of 200 accounts on one
subnet is 200 edges, not 19,900. :func:`layout` is a plain function returning coordinates; the
template draws them as inline SVG (no script, so hostile ids stay text).
"""

from __future__ import annotations

import math
from typing import Any

KIND_COLOURS = {"ip": "#d9534f", "subnet": "#f0ad4e", "ua": "#5bc0de", "payment": "#9b59b6"}
MAX_HUBS = 60
MAX_LABELS = 40


def _ring(n: int, cx: float, cy: float, r: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(round(cx + r * math.cos(phase + 2 * math.pi * i / max(n, 1)), 1),
             round(cy + r * math.sin(phase + 2 * math.pi * i / max(n, 1)), 1)) for i in range(n)]


def layout(members: list[dict[str, Any]], hubs: list[tuple[str, str, list[str]]],
           size: float = 640.0) -> dict[str, Any]:
    """Node and edge coordinates for an SVG of ``size`` x ``size``.

    ``members``: dicts with ``account_id`` and ``score``; ``hubs``: (kind, value, member ids),
    largest first (at most ``MAX_HUBS`` are drawn)."""
    c = size / 2
    accts = _ring(len(members), c, c, size * 0.36)  # room for the labels outside the ring
    shown = hubs[:MAX_HUBS]
    inner = _ring(len(shown), c, c, size * 0.2 if len(shown) > 1 else 0.0, phase=math.pi / max(len(shown), 1))
    pos = {m["account_id"]: p for m, p in zip(members, accts)}
    top = max((float(m.get("score") or 0.0) for m in members), default=0.0) or 1.0
    label = len(members) <= MAX_LABELS
    nodes = [{"id": m["account_id"], "x": x, "y": y, "r": round(4 + 6 * max(float(m.get("score") or 0.0), 0) / top, 1),
              "score": float(m.get("score") or 0.0), "label": m["account_id"][:24] if label else "",
              # labels sit outside the ring, anchored away from the centre
              "lx": round(x + (14 if x >= c else -14), 1), "ly": round(y + (16 if y > c else -8), 1),
              "anchor": "start" if x >= c else "end"} for m, (x, y) in zip(members, accts)]
    hub_nodes, edges = [], []
    for (kind, value, ids), (x, y) in zip(shown, inner):
        colour = KIND_COLOURS.get(kind, "#777")
        hub_nodes.append({"kind": kind, "value": value, "x": x, "y": y, "count": len(ids), "colour": colour,
                          "label": f"{kind} {value[:22]}" if len(shown) <= MAX_LABELS // 2 else ""})
        for aid in ids:
            if aid in pos:
                ax, ay = pos[aid]
                edges.append({"x1": x, "y1": y, "x2": ax, "y2": ay, "colour": colour})
    return {"size": size, "nodes": nodes, "hubs": hub_nodes, "edges": edges, "hidden_hubs": len(hubs) - len(shown),
            "legend": list(KIND_COLOURS.items())}
