"""The detector's cost on the guard's request path: microseconds per ``observe`` + ``verdict``.

Generates a benign arena population plus two campaigns, fits a detector on the benign part,
then replays every request through ``observe`` and ``verdict`` and reports thread-CPU and wall
time percentiles. CPU time of this thread is what the request path pays; wall time also counts
waiting for a core, which on a shared, oversubscribed machine dominates the tail.

    stillhouse bench detect --accounts 300 --days 2 --embedder hash
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class BenchDetectConfig:
    """What ``stillhouse bench detect`` measures."""

    accounts: int = 300
    """Benign accounts to generate (plus a few campaign accounts)."""
    days: float = 2.0
    """Simulated days of traffic."""
    embedder: Literal["hash", "minilm"] = "hash"
    """The detector's query embedder; 'minilm' runs it with a cold cache (worst case)."""

    def __post_init__(self) -> None:
        if self.accounts < 10:
            raise ValueError(f"accounts={self.accounts}: use at least 10")
        if self.days <= 0:
            raise ValueError(f"days={self.days}: must be > 0")
        if self.embedder not in ("hash", "minilm"):
            raise ValueError(f"embedder={self.embedder!r}: choose 'hash' or 'minilm'")


def run_bench(cfg: BenchDetectConfig) -> dict[str, Any]:
    """Percentiles (microseconds) of observe+verdict, thread CPU and wall, over one replayed log."""
    from stillhouse.arena.campaigns import CampaignConfig, generate_campaign
    from stillhouse.arena.population import PopulationConfig, generate_population
    from stillhouse.arena.simulate import DirectGateway, SimClock, run_traffic
    from stillhouse.guard.detect import DetectConfig, WindowDetector

    acc, turns = generate_population(PopulationConfig(accounts=cfg.accounts, days=cfg.days, seed=11))
    for i, shape in enumerate(("cot", "hydra")):
        a, t = generate_campaign(CampaignConfig(shape=shape, accounts=3 if shape == "cot" else 30,
                                                requests_per_account=200 if shape == "cot" else 10,
                                                days=cfg.days, seed=300 + i))
        acc, turns = acc + a, turns + t
    clock = SimClock()
    gw = DirectGateway(None, clock, keep_log=True)
    asyncio.run(run_traffic(acc, turns, gw, None, clock))
    infos = {a.info.account_id: a.info for a in acc}
    det = WindowDetector(DetectConfig(embedder=cfg.embedder))
    det.fit([r for r in gw.log if not r.account_id.startswith("x-")], infos)
    det.reset()
    wall, cpu = [], []
    for r in gw.log:
        t0, c0 = time.perf_counter(), time.thread_time()
        det.observe(r, infos[r.account_id])
        det.verdict(r.account_id)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    result: dict[str, Any] = {"requests": len(wall), "embedder": cfg.embedder,
                              "cluster_every": det.config.cluster_every,
                              "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    for name, xs in (("cpu", cpu), ("wall", wall)):
        us = np.array(xs) * 1e6
        result[name] = {"p50": float(np.median(us)), "p90": float(np.quantile(us, 0.9)),
                        "p99": float(np.quantile(us, 0.99)), "mean": float(us.mean())}
    return result


def format_text(result: dict[str, Any]) -> str:
    """The lines ``stillhouse bench detect`` prints."""
    lines = []
    for name in ("cpu", "wall"):
        s = result[name]
        lines.append(f"observe+verdict {name} time over {result['requests']} requests ({result['embedder']} embedder, "
                     f"cluster refresh every {result['cluster_every']}): p50 {s['p50']:.0f} us, p90 {s['p90']:.0f} "
                     f"us, p99 {s['p99']:.0f} us, mean {s['mean']:.0f} us")
    lines.append(f"load average while measuring: {result['load_average']:.1f} on {result['cpus']} CPUs")
    return "\n".join(lines)
