"""``stillhouse provenance text|model``: did this text, or this model, come from our watermarked answers?

Options are the fields of :class:`~stillhouse.provenance.run.ProvenanceConfig` and
:class:`~stillhouse.provenance.run.SuspectConfig` (derived by :mod:`stillhouse.cli_config`).
The report is printed as a short verdict plus a table (``--json`` prints the whole report).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stillhouse.cli_config import ConfigOptions, Given, config_command, fail
from stillhouse.watermark.green import DEFAULT_PARAMS

if TYPE_CHECKING:
    from stillhouse.arena.provenance import ProvenanceArenaConfig
    from stillhouse.provenance.run import ProvenanceConfig, SuspectConfig

TEXT_HELP = f"""Test text for our watermark: which candidate key (account, cluster) it carries, if any.

Each distinct (window, token) tuple is scored once, tuples of the prompt are dropped, and the p-value is exact; it is adjusted for the number of keys tried (Holm), so a key is named only when its adjusted p-value is below --alpha.

By default (--score weighted) each tuple counts by the evidence it can carry: the teacher (--tokenizer) reads the answer, and a token it would have written anyway counts little, one written against the odds counts up to 1 (its log-likelihood ratio under the watermarked sampler, from --delta and --temperature; wrong values cost power, never validity); the p-value is the exact tail of the weighted sum. --score count counts every tuple 1 (the binomial test).

By default only the answer tokens the teacher was unsure of are scored, as serve's default watermark biases only those (entropy gate {DEFAULT_PARAMS.entropy:g} nats, with delta {DEFAULT_PARAMS.delta:g}: the setting that kept the teacher's accuracy, docs/results.md); the teacher (--tokenizer) recomputes the entropies. --entropy 0 scores every token (text served with --watermark-entropy 0).

Keys per request (the guard ran with --watermark-per-request): each account is one hypothesis, and each text is scored under the key of the account's logged request it answers (the same answer, else the same prompt), pooled per account; give the log with --log.

Text served with --watermark-scheme exp: a guard's log records each answer's scheme (serve confirms it to the guard) and the test follows it; for a file, dataset or harvest run give --scheme exp. Answers sampled at a temperature above 0 (the guard's log and a harvest run record each one's; else --temperature) then take the EXP test: the sum of -log u over the distinct tuples whose window comes first in the answer and whose token the teacher gave less than 0.7, against its exact Gamma tail. Greedy answers take the green-list test; a body with both combines the two p-values (Fisher).

\b
Examples:
  stillhouse provenance text leaked.jsonl --log sqlite:///runs/guard.db
  stillhouse provenance text runs/h --key-ids account/lab/0 --scheme exp
  stillhouse provenance text runs/h --key-ids account/lab/0,account/acme/0 --json
"""

MODEL_HELP = f"""The radioactivity test: did a suspect model learn from our watermarked answers?

Open-weight (a local model): the suspect reads SOURCE's texts and its own next-token predictions are scored. With --reading own it answers SOURCE's prompts greedily on this machine instead, and its answers are scored: give it the questions our watermarked answers went to (SOURCE may be the guard's log itself, --account one account's), and a student that learned those answers writes them again. Closed (an OpenAI-compatible URL): it answers SOURCE's prompts and the answers are scored.

Distinct tuples only, none from the text read or the prompt, so a clean model gets a uniform p-value. Answers (--reading own, closed) are scored only where the teacher was unsure, as serve's default watermark biases only there (--entropy: default {DEFAULT_PARAMS.entropy:g} nats, the setting that kept the teacher's accuracy, docs/results.md; 0 scores every token), each token weighted by the evidence it can carry as in `provenance text` (--score count: every token 1); reading SOURCE's texts scores every prediction, counted.

With the guard's log as SOURCE, --match-keys tests each key only on the suspect's answers to the prompts that key answered, and --group A,B,... (repeatable) tests accounts together: each member's answers under the key that answered them, pooled into one exact test (so are the clusters the guard's detector linked, unless --no-cluster-groups). Holm runs over keys and groups together.

--test counterfactual asks whether the suspect prefers our answers, as whole answers, to the ones other keys would have drawn: for every answer in SOURCE the teacher (--tokenizer) draws --counterfactuals K more for the same prompt with the recorded recipe, each under a key of its own, and our answer is ranked among the K + 1 by the suspect (reading text: its log-likelihood minus the reference's over each answer's first 64 tokens, --prefix-tokens; its own answers, --reading own or closed: their 4-gram overlap; a closed suspect answers each prompt greedily and 4 times more at T 0.7, pooled, --sampled-answers). Per account (and --group, and linked cluster) the ranks' sum has an exact tail; Holm runs over all. It needs a key per request (the guard's --watermark-per-request), so SOURCE is that guard's log or JSONL rows with each answer's key_id; --cache keeps the drawn answers for the next suspect.

\b
Examples:
  stillhouse provenance model reading.jsonl --suspect hf:runs/student/final --log sqlite:///runs/guard.db
  stillhouse provenance model sqlite:///runs/guard.db --account lab --reading own --suspect hf:runs/s/final --log sqlite:///runs/guard.db
  stillhouse provenance model prompts.jsonl --suspect http://127.0.0.1:8001/v1 --key-ids account/lab/0
  stillhouse provenance model sqlite:///runs/guard.db --reading own --suspect hf:runs/s/final --log sqlite:///runs/guard.db --match-keys --group camp-0,camp-1
  stillhouse provenance model sqlite:///runs/guard.db --suspect hf:runs/s/final --test counterfactual --scheme exp --cache runs/cf.jsonl
"""


def _bars() -> Any:
    """Progress on stderr (stdout keeps the report, --json included)."""
    from rich.console import Console

    from stillhouse.progress import step_bars

    return step_bars(Console(stderr=True))


def _top(header: str, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], str], what: str) -> None:
    """A table of the first ten rows (the report keeps them all)."""
    typer.echo(header)
    for r in rows[:10]:
        typer.echo(line(r))
    if len(rows) > 10:
        typer.echo(f"... {len(rows) - 10} more {what} (--json shows all)")


def _print(report: dict[str, Any], as_json: bool, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    typer.echo(report["verdict"])
    if report.get("test") == "counterfactual":
        k = report["k"]
        typer.echo(f"our answer's rank among {k + 1} ({report['score']}), per hypothesis:")
        _top(f"{'account or group':40} {'answers':>7} {'first':>6} {'mean rank':>9} {'p':>10} {'p (Holm)':>10}",
             report["hypotheses"], lambda h: f"{h['name'][:40]:40} {h['answers']:7d} {h['first']:6d} "
             f"{h['mean_rank']:9.2f} {h['p']:10.3g} {h['p_holm']:10.3g}", "hypotheses")
        typer.echo(f"(under H0 each rank is uniform: mean rank {(k + 2) / 2:g})")
        return
    _top(f"{'key id':40} {'scored':>7} {'green':>6} {'rate':>6} {'p':>10} {'p (Holm)':>10}  accounts", report["scores"],
         lambda s: f"{s['key_id'][:40]:40} {s['scored']:7d} {s['green']:6d} {s['rate']:6.3f} {s['p']:10.3g} "
         f"{s['p_holm']:10.3g}  {','.join(s['accounts'])}", "keys")
    if report.get("groups"):
        typer.echo(f"{'group (pooled, keys matched)':40} {'scored':>7} {'green':>6} {'rate':>6} {'p':>10} "
                   f"{'p (Holm)':>10}  accounts (given by)")
        for g in report["groups"]:
            typer.echo(f"{g['name'][:40]:40} {g['scored']:7d} {g['green']:6d} {g['rate']:6.3f} {g['p']:10.3g} "
                       f"{g['p_holm']:10.3g}  {','.join(g['accounts'])} ({g['given_by']})")


def text_command(
    settings: Given[ProvenanceConfig],
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as JSON to this file."),
) -> None:
    from stillhouse.provenance.run import text_provenance
    from stillhouse.provenance.texts import TextSourceError
    from stillhouse.watermark.keys import WatermarkKeyError

    try:
        with _bars() as progress:
            report = text_provenance(settings.config(), progress)
    except (ValueError, TextSourceError, WatermarkKeyError) as exc:
        fail(exc)
    _print(report, as_json, out)


def model_command(
    settings: Given[SuspectConfig],
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as JSON to this file."),
) -> None:
    from stillhouse.provenance.run import model_provenance

    try:
        with _bars() as progress:
            report = model_provenance(settings.config(), progress)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    _print(report, as_json, out)


ARENA_HELP = """The whole provenance loop on loopback: a campaign harvests through a real guard in front of the
watermarking teacher, a student trains on what leaked, and the radioactivity test over every key id in the
guard's log says whose accounts it learned from.

Writes OUT/provenance.json (named accounts, every key's and group's score, timings, and the command that runs the test again), the guard's log, the leaked rows and the student. The secret is $STILLHOUSE_WATERMARK_SECRET, or one made for this run and written to OUT/watermark.secret (mode 0600; never into the log or the report).

The defaults are the recipe measured in docs/results.md: two campaign accounts ask 120 questions each, the teacher answers with the gated watermark (delta 1.5, gate 2.0 nats), a copy of the teacher learns the leak (2 passes), answers every question in the log, and each key is tested on its own questions, the campaign as a pooled group beside two decoy groups (Holm over all). About half an hour on 2 CPU cores.

\b
Examples:
  stillhouse provenance arena --out runs/pa
  stillhouse provenance arena --out runs/pa --seed 1 --requests-per-account 80
  stillhouse provenance arena --out runs/pa --no-match-keys   # all answers, all keys
  stillhouse provenance arena --out runs/pa --no-own-answers --no-match-keys --entropy 0
  stillhouse provenance arena --out runs/pa --scheme exp --test counterfactual   # a key per request
"""


def arena_command(
    settings: Given[ProvenanceArenaConfig],
    out: Path = typer.Option(Path("provenance-arena"), "--out", help="Run directory."),
) -> None:
    from stillhouse.arena.provenance import run_provenance

    try:
        m = run_provenance(settings.config(), out)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    best = m["best"] or {}
    typer.echo(f"{m['leaked_rows']} rows leaked from {len(m['campaign_accounts'])} campaign accounts; "
               f"{m['keys_in_log']} keys in the guard's log")
    if m.get("test") == "counterfactual":
        tested = f"{len(m['hypotheses'])} hypotheses (accounts and groups, counterfactual test)"
    elif m.get("groups"):
        tested = f"{len(m['scores']) + len(m['groups'])} hypotheses ({m['keys_in_log']} keys, {len(m['groups'])} groups)"
    else:
        tested = f"{m['keys_in_log']} keys"
    typer.echo(f"named: {', '.join(m['named_accounts']) or 'nobody'} (best {best.get('name', best.get('key_id', '-'))}, "
               f"Holm-adjusted p = {best.get('p_holm', 1.0):.3g} over {tested}); "
               f"goal {'met' if m['goal_met'] else 'not met'}; {out / 'provenance.json'}")
    typer.echo(f"secret: {m['secret']}; test again with: {m['retest']}")


def register(app: typer.Typer) -> None:
    """Add ``provenance text``, ``provenance model`` and ``provenance arena``."""
    from stillhouse.arena.provenance import ProvenanceArenaConfig
    from stillhouse.provenance.run import ProvenanceConfig, SuspectConfig

    sub = typer.Typer(help="Provenance: test text and suspect models for our watermark keys.", no_args_is_help=True)
    panels = {"source": "Input", "log": "Candidate keys", "gamma": "Scheme (as served)", "limit": "Scoring"}
    sub.command("text", help=TEXT_HELP)(config_command(text_command, ConfigOptions(
        ProvenanceConfig, arguments=("source",), comma=("key_ids",), panels=panels, replay=False)))
    sub.command("model", help=MODEL_HELP)(config_command(model_command, ConfigOptions(
        SuspectConfig, arguments=("source",), comma=("key_ids",),
        flags={"suspect": ("--suspect", "-s"), "groups": ("--group",)},
        panels={**panels, "suspect": "Suspect"}, replay=False)))
    sub.command("arena", help=ARENA_HELP)(config_command(arena_command, ConfigOptions(ProvenanceArenaConfig)))
    app.add_typer(sub, name="provenance")
