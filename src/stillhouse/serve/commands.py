"""The ``stillhouse serve`` verb: ServeConfig's fields as options, then ``serve.app.run``.

Every option is a field of :class:`~stillhouse.serve.app.ServeConfig` (named, typed, documented
and defaulted there; :mod:`stillhouse.cli_config` derives the option). Heavy imports (torch,
transformers, uvicorn) happen inside the command function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from stillhouse.cli_config import ConfigError, ConfigOptions, Given, config_command, fail, save_effective

if TYPE_CHECKING:
    from stillhouse.serve.app import ServeConfig

SERVE_HELP = """Serve a teacher over an OpenAI-compatible API (chat completions, SSE streaming,
logprobs and top_logprobs, n, seed, stop, tools, reasoning_content) with continuous batching:
concurrent requests share forward passes.

POST /v1/score returns the log-probabilities of a given completion (vLLM's prompt_logprobs), what
black-box on-policy distillation asks. --watermark keys each answer (the guard chooses the key).

\b
Examples:
  stillhouse serve --teacher bundled --port 8000
  stillhouse serve --teacher hf:./my-model --max-batch 8 --max-tokens-limit 512
  stillhouse serve --config serve.json            (replay a saved config)

\b
Then:
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "bundled", "messages": [{"role": "user", "content": "Hi"}],
         "max_tokens": 20, "logprobs": true, "top_logprobs": 3}'

The first `bundled` load converts the GGUF to safetensors once (~25-40 s); later loads
read the cache ($STILLHOUSE_CACHE, default ~/.cache/stillhouse) in a few seconds.
Requests default to temperature 1.0, as OpenAI's API does; send 0 for greedy decoding.
"""


def serve_command(
    settings: Given[ServeConfig],
    config: Path | None = typer.Option(None, "--config", help="Load settings from a JSON file saved with "
                                                                "--save-config; options given too override it."),
    save_config: Path | None = typer.Option(None, "--save-config", help="Write the effective settings as JSON "
                                                                          "to this file, then serve."),
) -> None:
    from stillhouse.serve.app import run
    from stillhouse.watermark.keys import WatermarkKeyError

    try:
        cfg = settings.resolve(config)
    except ConfigError as exc:
        fail(exc)
    save_effective(cfg, save_config)
    try:
        run(cfg)
    except WatermarkKeyError as exc:
        fail(exc)
    except OSError as exc:
        typer.echo(f"stillhouse serve: {exc}", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""
    from stillhouse.serve.app import ServeConfig

    options = ConfigOptions(ServeConfig, flags={"teacher": ("--teacher", "-t")}, panels={
        "teacher": "Server", "max_batch": "Batching", "max_tokens_limit": "Request limits", "served_name": "Model",
        "watermark": "Watermark"})
    app.command("serve", help=SERVE_HELP)(config_command(serve_command, options))
