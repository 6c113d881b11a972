"""The ``stillhouse train`` verb: TrainConfig's fields as options, then ``distill.train.train``.

    stillhouse train --data curated.jsonl --teacher bundled --student pruned:10 --loss sft --out runs/s1
    stillhouse train --config runs/s1/train_config.json          # replay (or resume) a saved run

Every option is a field of :class:`~stillhouse.distill.train.TrainConfig` (named, typed,
documented and defaulted there; :mod:`stillhouse.cli_config` derives the option).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from stillhouse.cli_config import ConfigOptions, Given, config_command, fail

if TYPE_CHECKING:
    from stillhouse.distill.train import TrainConfig

_HELP = """Train a student on teacher data and export it as an HF directory (OUT/final).

Losses: sft = cross-entropy on the teacher's text (sequence-level KD, assistant tokens only);
fkl / rkl / jsd = dense logit KD against the live local teacher (forward KL, reverse KL,
generalized JSD with --beta), softened by --temperature (the teacher alone sharpened toward its
greedy token by --teacher-temperature below 1); topk = KD from the harvested top-k
logprobs with a tail bucket (API teachers). KD losses mix in CE with --alpha
(loss = alpha*CE + (1-alpha)*KD); both terms are logged in OUT/metrics.jsonl.

Students: pruned:N (N of the teacher's layers, evenly spaced), every:K, layers:I,J,...
(exactly those layers, e.g. layers:0,1,2,3,14,15,26,27,28,29), fresh, fresh:N, self.

\b
Examples:
  stillhouse train --data curated.jsonl --student pruned:10 --loss sft --epochs 3 --out runs/s1
  stillhouse train --data curated.jsonl --student self --loss topk --alpha 0.5 --out runs/s2
  stillhouse train --config runs/s1/train_config.json --epochs 4      (replay, one setting changed)

Re-running the same command resumes from the newest checkpoint in OUT/checkpoints (after a kill -9 too). \
A rerun may go further (--epochs, --max-examples) or run differently (--threads, --device, --save-every); \
one that would train differently (--lr, --seed, --loss, --student, ...) is refused, naming each change: \
give a new --out to start over.

Serve the result with: stillhouse serve --teacher hf:OUT/final
"""


def train_command(
    settings: Given[TrainConfig],
    config: Path | None = typer.Option(None, "--config", help="Replay a saved OUT/train_config.json; options "
                                                                "given too override it."),
) -> None:
    from stillhouse.config import ConfigError
    from stillhouse.distill.data import DataError
    from stillhouse.distill.train import TrainConfigError, train

    # resolve maps a bad field to ConfigError; train raises TrainConfigError when OUT holds a run of other settings
    try:
        cfg = settings.resolve(config)
        res = train(cfg)
    except (ConfigError, DataError, TrainConfigError) as exc:
        fail(exc)
    last = res.last
    typer.echo(f"trained {res.steps} steps, {res.examples_seen} examples, {res.tokens_seen} tokens in "
               f"{res.wall_s:.0f}s; last loss {last.get('loss', float('nan')):.4f} "
               f"(ce {last.get('ce', float('nan')):.4f}, kd {last.get('kd', float('nan')):.4f}); "
               f"peak memory {res.peak_memory_mib:,.0f} MiB")
    typer.echo(f"model: {res.final_dir}  (serve: stillhouse serve --teacher hf:{res.final_dir})")


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""
    from stillhouse.distill.train import TrainConfig

    options = ConfigOptions(TrainConfig, panels={
        "data": "Run", "loss": "Loss", "only_correct": "Data", "epochs": "Optimization", "lora_r": "What trains",
        "save_every": "Checkpoints and exports", "threads": "Hardware"})
    app.command("train", help=_HELP)(config_command(train_command, options))
