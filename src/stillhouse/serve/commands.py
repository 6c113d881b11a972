"""CLI verbs of the teacher area: ``stillhouse serve`` and ``stillhouse bench serve``.

Heavy imports (torch, transformers, uvicorn) happen inside the command functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

SERVE_HELP = """Serve a teacher over an OpenAI-compatible API (chat completions, SSE streaming,
logprobs and top_logprobs, n, seed, stop) with continuous batching: concurrent requests
share forward passes.

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


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""

    @app.command("serve", help=SERVE_HELP)
    def serve(
        teacher: str = typer.Option(None, "--teacher", "-t",
                                    help="bundled | hf:DIR | gguf:FILE | http://HOST:PORT/v1[#MODEL] | fake"),
        host: str = typer.Option(None, help="Interface to bind [default: 127.0.0.1]."),
        port: int = typer.Option(None, help="TCP port; 0 picks a free one [default: 8000]."),
        max_batch: int = typer.Option(None, help="Most completions decoded together; 1 disables batching "
                                                 "[default: 32]."),
        batch_window_ms: float = typer.Option(None, help="When idle, wait this long for more requests to share "
                                                         "the first forward pass [default: 5]."),
        no_continuous: bool = typer.Option(False, "--no-continuous",
                                           help="Run each batch to completion before admitting new requests."),
        max_tokens_limit: int = typer.Option(None, help="Largest max_tokens a request may ask for "
                                                        "[default: 2048]."),
        default_max_tokens: int = typer.Option(None, help="max_tokens when a request sends none [default: 512]."),
        max_context: int = typer.Option(None, help="Prompt + max_tokens limit [default: the model's]."),
        served_name: str = typer.Option(None, help="Model id to report and accept [default: the teacher's]."),
        dtype: str = typer.Option(None, help="float32 or bfloat16 for a local teacher [default: float32]."),
        threads: int = typer.Option(None, help="torch CPU threads [default: torch's]. On a busy shared machine "
                                               "1 can be far faster than oversubscribed threads."),
        config: Path = typer.Option(None, "--config", help="Load settings from a JSON file saved with "
                                                           "--save-config; flags given here override it."),
        save_config: Path = typer.Option(None, "--save-config", help="Write the effective settings as JSON "
                                                                     "to this file, then serve."),
    ) -> None:
        import dataclasses

        from stillhouse.config import ConfigError, load_config
        from stillhouse.config import save_config as write_config
        from stillhouse.serve.app import ServeConfig, run

        try:
            base = load_config(ServeConfig, config) if config else ServeConfig()
            overrides: dict[str, Any] = {k: v for k, v in dict(
                teacher=teacher, host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms,
                max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens,
                max_context=max_context, served_name=served_name, dtype=dtype, threads=threads).items() if v is not None}
            if no_continuous:
                overrides["continuous"] = False
            cfg = dataclasses.replace(base, **overrides)
        except (ValueError, ConfigError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        if save_config:
            write_config(cfg, save_config)
        try:
            run(cfg)
        except OSError as exc:
            typer.echo(f"stillhouse serve: {exc}", err=True)
            raise typer.Exit(2) from exc
        except KeyboardInterrupt:
            pass
