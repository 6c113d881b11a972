"""CLI verbs of the guard: ``guard`` (run the gateway), ``guard admin ...``, ``guard demo``, ``bench guard``.

    stillhouse guard --upstream http://127.0.0.1:8000 --port 8080 --db sqlite:///runs/guard.db
    stillhouse guard --upstream http://127.0.0.1:8000 --detector runs/detector --shadow
    STILLHOUSE_GUARD_ADMIN_TOKEN=... stillhouse guard admin --url http://127.0.0.1:8080 create-account --org acme
    stillhouse guard demo --fake
    stillhouse bench guard --out docs/bench-guard.json

Thin: each command parses arguments and calls the library (``guard/server.py``, ``guard/admin.py``,
``guard/demo.py``). The gateway's options are GuardConfig's fields (derived by :mod:`stillhouse.cli_config`;
``rules`` and the admin token's hash come from ``--config`` and the environment). Heavy imports live
inside the functions so ``stillhouse --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import typer

from stillhouse.cli_config import ConfigOptions, Given, config_command, fail, save_effective

if TYPE_CHECKING:
    from stillhouse.guard.config import GuardConfig

ADMIN_ENV = "STILLHOUSE_GUARD_ADMIN_TOKEN"

guard_app = typer.Typer(
    help=(
        "The guard: an OpenAI-compatible gateway that authenticates, logs, limits and enforces.\n\n"
        "Run it in front of any OpenAI-compatible upstream:\n\n"
        "  export STILLHOUSE_GUARD_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe())')\n\n"
        "  stillhouse guard --upstream http://127.0.0.1:8000 --port 8080 --db sqlite:///runs/guard.db\n\n"
        "then create accounts and keys with `stillhouse guard admin ...`. Clients use the guard as their\n"
        "OpenAI base URL (http://127.0.0.1:8080/v1) with `Authorization: Bearer sk-sh-...`.\n\n"
        "Online detection: fit a detector on benign traffic, then hand it to the guard\n\n"
        "  stillhouse detect --fit --log benign.jsonl --model runs/detector\n\n"
        "  stillhouse guard --upstream http://127.0.0.1:8000 --detector runs/detector --shadow\n\n"
        "(--shadow records what the detector would do; drop it to enforce)."
    ),
    invoke_without_command=True,
    no_args_is_help=False,
)
admin_app = typer.Typer(help="Administer a running guard through its admin API (accounts, keys, decisions).",
                        no_args_is_help=True)
guard_app.add_typer(admin_app, name="admin")


def _die(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def guard(
    ctx: typer.Context,
    settings: Given[GuardConfig],
    config: str | None = typer.Option(None, "--config", help="A complete guard config JSON (every field; see "
                                      "--print-config). Options given too override it."),
    admin_token_env: str = typer.Option(ADMIN_ENV, help="Environment variable holding the admin token."),
    save_config: str | None = typer.Option(None, help="Write the resolved config (no secrets) to this JSON file."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
) -> None:
    """Run the guard gateway (or a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from stillhouse.config import ConfigError, config_to_dict
    from stillhouse.guard.config import load_guard_config, sha256_hex

    if config:
        try:
            cfg = settings.resolve(config, load=lambda _cls, path: load_guard_config(path))
        except ConfigError as exc:
            fail(exc)
    else:
        token = os.environ.get(admin_token_env, "")
        if not token and not print_config:
            _die(f"set the admin token in ${admin_token_env} (e.g. export {admin_token_env}=$(python -c "
                 "'import secrets; print(secrets.token_urlsafe())')); the admin API needs it")
        base = {"admin_token_sha256": sha256_hex(token or "change-me")}
        if print_config:  # a template to edit: any upstream will do
            base["upstream_url"] = "http://127.0.0.1:8000"
        try:
            cfg = settings.config(base)
        except ConfigError as exc:
            fail(exc)
    if print_config:
        typer.echo(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
        return
    save_effective(cfg, save_config)
    from stillhouse.guard.detect.load import DetectorLoadError, load_detector
    from stillhouse.guard.server import serve_forever

    if cfg.watermark:  # the shared secret must be there before anything binds or loads
        from stillhouse.watermark.keys import WatermarkKeyError, load_secret

        try:
            load_secret(cfg.watermark_secret_env)
        except WatermarkKeyError as exc:
            _die(str(exc))

    det = None
    if cfg.detector_dir:
        try:
            det = load_detector(cfg.detector_dir)  # before binding the port: a bad DIR fails fast
        except DetectorLoadError as exc:
            _die(str(exc))
            return
    typer.echo(f"guard on http://{cfg.host}:{cfg.port}/v1 → {cfg.upstream_url}  (log: {cfg.db_url}, "
               f"store failure: fail-{cfg.on_store_failure}{', SHADOW' if cfg.shadow else ''})", err=True)
    if det is not None:
        typer.echo(f"detector: {cfg.detector_dir} (thresholds {det.thresholds_}; {cfg.detect_mode}; verdicts "
                   f"{'recorded only (shadow)' if cfg.shadow else 'enforced'})", err=True)
        if cfg.detect_mode == "process":
            from stillhouse.guard.detect.remote import ProcessDetector

            det = ProcessDetector(cfg.detector_dir)  # checked above; the child loads its own copy
    serve_forever(cfg, detector=det)


# -- admin --------------------------------------------------------------------------------
_ADMIN_URL = typer.Option("http://127.0.0.1:8080", "--url", envvar="STILLHOUSE_GUARD_URL",
                          help="The guard's base URL.")
_ADMIN_TOKEN = typer.Option(None, "--token", envvar=ADMIN_ENV,
                            help=f"Admin token (default: ${ADMIN_ENV}).")


def _call(url: str, token: str | None, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    import urllib.error
    import urllib.request

    if not token:
        _die(f"no admin token: pass --token or set ${ADMIN_ENV}")
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            msg = exc.reason
        _die(f"{method} {path} → {exc.code}: {msg}")
    except OSError as exc:
        _die(f"cannot reach the guard at {url}: {exc}")
    typer.echo(json.dumps(out, indent=2))
    return out


@admin_app.command("create-account")
def create_account(
    account_id: str = typer.Option(None, help="Id (default: generated acct_...)."),
    org: str = typer.Option("", help="Organisation."),
    signup_path: str = typer.Option("", help="How the account signed up (web, partner, api, ...)."),
    country: str = typer.Option("", help="Country code."),
    payment_fingerprint: str = typer.Option("", help="Payment fingerprint; stored as SHA-256 unless already a hash."),
    rpm: int = typer.Option(None, "--rpm", help="Requests/min override."),
    tpm: int = typer.Option(None, "--tpm", help="Tokens/min override."),
    max_streams: int = typer.Option(None, help="Concurrent streams override."),
    rpd: int = typer.Option(None, "--rpd", help="Requests/day override (a degraded account gets at most the "
                            "guard's --degrade-requests-per-day)."),
    url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN,
) -> None:
    """Create (or update) an account."""
    body: dict[str, Any] = {"org": org, "signup_path": signup_path, "country": country,
                            "payment_fingerprint": payment_fingerprint,
                            "limits": {"requests_per_min": rpm, "tokens_per_min": tpm,
                                       "max_concurrent_streams": max_streams, "requests_per_day": rpd}}
    if account_id:
        body["account_id"] = account_id
    _call(url, token, "POST", "/admin/accounts", body)


@admin_app.command("accounts")
def accounts(url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """List accounts."""
    _call(url, token, "GET", "/admin/accounts")


@admin_app.command("account")
def account(account_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Show one account, its keys and why it gets the decision it gets."""
    _call(url, token, "GET", f"/admin/accounts/{account_id}")


@admin_app.command("issue-key")
def issue_key(account_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Issue an API key (printed once; the guard keeps only its hash)."""
    _call(url, token, "POST", f"/admin/accounts/{account_id}/keys")


@admin_app.command("keys")
def keys(account_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """List an account's keys (ids and times only)."""
    _call(url, token, "GET", f"/admin/accounts/{account_id}/keys")


@admin_app.command("revoke-key")
def revoke_key(key_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Revoke a key: its next request gets 401."""
    _call(url, token, "POST", f"/admin/keys/{key_id}/revoke")


@admin_app.command("rotate-key")
def rotate_key(key_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Revoke a key and issue its replacement."""
    _call(url, token, "POST", f"/admin/keys/{key_id}/rotate")


@admin_app.command("decisions")
def decisions(target: str = typer.Option(None, help="Account or cluster id."),
              active: bool = typer.Option(False, "--active", help="Only decisions in force."),
              url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """List decisions with their reasons and signals."""
    q = "&".join(p for p in ((f"target={target}" if target else ""), ("active=true" if active else "")) if p)
    _call(url, token, "GET", "/admin/decisions" + (f"?{q}" if q else ""))


@admin_app.command("decide")
def decide(target: str, action: str = typer.Argument(..., help="allow | throttle | degrade | block"),
           scope: str = typer.Option("account", help="account or cluster"),
           reason: str = typer.Option("", help="Why (kept with the decision)."),
           at_least: bool = typer.Option(False, "--at-least", help="At least this action: the detector and the "
                                         "rules may still go harsher (a watch list: `decide ACCT throttle "
                                         "--at-least`). Without it the decision is exact and overrides them."),
           url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Set a manual decision on an account or cluster (overrides automatic ones, or with --at-least, a floor)."""
    _call(url, token, "POST", "/admin/decisions", {"scope": scope, "target": target, "action": action,
                                                    "reason": reason, "at_least": at_least})


@admin_app.command("clear-decision")
def clear_decision(decision_id: str, url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Reverse a decision."""
    _call(url, token, "POST", f"/admin/decisions/{decision_id}/clear")


@admin_app.command("traffic")
def traffic(account_id: str = typer.Option(None), limit: int = typer.Option(20),
            url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Show traffic-log records (as stored, i.e. redacted per config)."""
    q = f"?limit={limit}" + (f"&account_id={account_id}" if account_id else "")
    _call(url, token, "GET", "/admin/traffic" + q)


@admin_app.command("stats")
def stats(url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """Log writer state: store up/down, spooled and replayed records."""
    _call(url, token, "GET", "/admin/stats")


@admin_app.command("detector")
def detector(url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN) -> None:
    """The loaded detector (directory, thresholds) and its reloads."""
    _call(url, token, "GET", "/admin/detector")


@admin_app.command("reload-detector")
def reload_detector(url: str = _ADMIN_URL, token: str = _ADMIN_TOKEN,
                    timeout: float = typer.Option(900.0, help="Seconds to wait (the new model replays the log's "
                                                                "last window first).")) -> None:
    """Load the model --detector DIR points to now (after `stillhouse detect watch` promoted one), its window
    rebuilt from the log; the current one keeps scoring until it is ready."""
    _call(url, token, "POST", "/admin/detector/reload", timeout=timeout)


# -- demo ---------------------------------------------------------------------------------
@guard_app.command("demo")
def demo(
    upstream: str = typer.Option(None, help="Guard this running upstream instead of starting one."),
    fake: bool = typer.Option(False, "--fake", help="Use the built-in fake upstream instead of `stillhouse serve`."),
    prompt: str = typer.Option("What is 12 + 30?", help="The chat message to send through the guard."),
) -> None:
    """Run the guard in front of `stillhouse serve` (or --fake / --upstream) and send one request with a key."""
    from stillhouse.guard.demo import run_demo

    try:
        run_demo(upstream=upstream, fake=fake, prompt=prompt)
    except RuntimeError as exc:
        _die(str(exc))


def register(app: typer.Typer) -> None:
    """Add the guard's verbs to the CLI."""
    from stillhouse.guard.config import GuardConfig

    options = ConfigOptions(GuardConfig, skip=("admin_token_sha256", "rules"), flags={
        "upstream_url": "--upstream", "db_url": "--db", "requests_per_min": "--rpm", "tokens_per_min": "--tpm",
        "max_concurrent_streams": "--max-streams", "detector_dir": "--detector", "shadow": "--shadow/--enforce"},
        panels={"upstream_url": "Gateway", "requests_per_min": "Limits and enforcement",
                "on_store_failure": "Traffic log", "detector_dir": "Online detection", "watermark": "Watermark"})
    guard_app.callback()(config_command(guard, options))
    app.add_typer(guard_app, name="guard")
