"""Command-line options derived from a frozen config dataclass: one source per setting.

A setting is named, typed, documented and defaulted once, as a field of its component's
config dataclass; the string literal right under a field is its documentation.
:class:`ConfigOptions` reads those fields and gives typer one option per field;
:func:`config_command` builds a verb from a function plus those options, and hands the
function what the user typed as a :class:`Given`::

    def train_command(settings: Given[TrainConfig],
                      config: Path | None = typer.Option(None, "--config", help="Replay ...")) -> None:
        cfg = settings.resolve(config)       # the replayed file (if any), then the options typed
        ...

    app.command("train", help=HELP)(config_command(train_command, ConfigOptions(TrainConfig)))

Field to option:

- name: ``--field-name`` (underscores become dashes). ``flags={field: decls}`` replaces the
  spellings, e.g. ``("--teacher", "-t")``, ``"--timeout"`` (an older, shorter spelling kept for
  ``timeout_s``) or ``"--shadow/--enforce"``;
- ``bool``: ``--x/--no-x``; ``Literal[...]``: one of the values (listed in the help); ``int``,
  ``float``, ``str`` as typed; ``X | None`` also takes ``none``;
- ``tuple[X, ...]``: repeatable; numbers (and the str fields named in ``comma``) also split on
  commas; a lone ``''`` or ``none`` gives the empty tuple;
- default: the field's, shown in ``--help``; a field without one is required unless ``--config``
  gives it. help: the field's docstring.

Only options the user typed override the replayed config: typer's parameter source tells them
apart from defaults, so ``--config FILE --lr 3e-4`` changes the learning rate and nothing else.
A ``ValueError`` from the config's ``__post_init__`` comes back as a :class:`ConfigError` that
starts with the option it is about (``--loss: loss='x': use sft, fkl, ...``); :func:`fail`
prints it as one line.

This is the ground floor of the CLI: it imports typer and :mod:`stillhouse.config`, nothing above.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import linecache
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Generic, Literal, NoReturn, TypeVar

import typer

from stillhouse.config import ConfigError, load_config, save_config

C = TypeVar("C")

Kind = Literal["bool", "int", "float", "str", "choice", "list"]
_SCALARS: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "str"}
_METAVARS = {"int": "INT", "float": "FLOAT", "str": "TEXT"}
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # parameter sources that count as "the user set it"


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal right under each field.

    Whitespace is collapsed to single spaces (help text wraps it again). Empty when the
    source cannot be read (a frozen application), so the CLI still works, without help.
    Fields inherited from a dataclass base keep the base's docstrings.
    """
    docs: dict[str, str] = {}
    for base in cls.__mro__[-2:0:-1]:  # bases first (object excluded), so a subclass's own text wins
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    docs.update(_own_field_docs(cls))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    source = _class_source(cls)
    if source is None:
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _class_source(cls: type) -> str | None:
    """The source of a class statement, dedented.

    Cut from the module's text when the class name occurs once there: parsing only the class
    is what keeps ``stillhouse --help`` fast (``inspect.getsource`` parses the whole module,
    about 30 ms per config). Otherwise, or when the cut does not parse, inspect's answer.
    """
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    lines = linecache.getlines(path) if path else []
    head = re.compile(rf"^([ \t]*)class[ \t]+{re.escape(cls.__name__)}\b")
    starts = [i for i, line in enumerate(lines) if head.match(line)]
    if len(starts) == 1:
        first = starts[0]
        indent = len(head.match(lines[first]).group(1))  # type: ignore[union-attr]
        end = first + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        source = textwrap.dedent("".join(lines[first:end]))
        try:
            ast.parse(source)
            return source
        except SyntaxError:  # e.g. a docstring line at column 0 ended the cut early
            pass
    try:
        return textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return None


def undocumented_fields(cls: type) -> list[str]:
    """Fields of ``cls`` without a docstring (every setting must explain itself)."""
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field appears on the command line."""

    name: str
    """The field name (and the typer parameter's name)."""
    decls: tuple[str, ...]
    """The spellings: ``("--max-tokens",)``, ``("--teacher", "-t")``, ``("--x/--no-x",)``."""
    kind: Kind
    """bool | int | float | str | choice (a Literal) | list (a tuple field)."""
    item: Kind = "str"
    """The element kind of a list, or the kind of an optional scalar."""
    choices: tuple[str, ...] = ()
    """The values a choice takes."""
    optional: bool = False
    """``X | None``: the word ``none`` gives None."""
    comma: bool = False
    """A list whose values are also split on commas."""
    required: bool = False
    """The field has no default: it must come from the options or the replayed config."""
    default: Any = None
    """The field's default (shown in --help)."""
    help: str = ""
    """The field's docstring."""

    @property
    def option(self) -> str:
        """The name errors use: the first long spelling."""
        return next((d.split("/")[0] for d in self.decls if d.startswith("--")), self.decls[0])


def _setting(f: dataclasses.Field[Any], hint: Any, doc: str, decls: tuple[str, ...] | None,
             comma: bool) -> Setting:
    """Derive one field's option from its annotation, default and docstring."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = (None if required else f.default if f.default is not dataclasses.MISSING
               else f.default_factory())  # type: ignore[misc, operator]
    optional = False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            optional, hint = True, rest[0]
            origin, args = typing.get_origin(hint), typing.get_args(hint)
    flag = "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"name": f.name, "required": required, "default": default, "help": doc,
                          "optional": optional}
    if hint is bool and not optional:
        # both spellings, whatever the default: a replayed file may have turned it either way
        return Setting(decls=decls or (f"{flag}/--no-{flag[2:]}",), kind="bool", **kw)
    if hint in (int, float, str):
        kind = _SCALARS[hint]
        return Setting(decls=decls or (flag,), kind=kind, item=kind, **kw)
    if origin is Literal and all(isinstance(a, str) for a in args):
        return Setting(decls=decls or (flag,), kind="choice", choices=tuple(args), **kw)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str) \
            and not optional:
        item = _SCALARS[args[0]]
        return Setting(decls=decls or (flag,), kind="list", item=item, comma=comma or item != "str", **kw)
    raise TypeError(f"{f.name}: {hint!r} has no command-line form; list the field in skip= "
                    "(it is then set through --config FILE only)")


class ConfigOptions(Generic[C]):
    """The command-line options of one config dataclass, derived from its fields.

    ``flags`` gives a field other spellings than ``--field-name`` (the whole list);
    ``skip`` names fields set through ``--config`` only (structured values, secrets);
    ``arguments`` names fields taken as positional arguments; ``comma`` names str-tuple
    fields whose values are also split on commas; ``panels`` groups the options in --help
    (``{field: title}``: that field and the ones after it, up to the next field named, go in one
    panel; each panel sizes its own columns, so a long name widens only its group).
    ``replay=False`` for a verb without ``--config``: settings without a default are then
    required by typer itself.
    """

    def __init__(self, cls: type[C], *, flags: Mapping[str, str | tuple[str, ...]] | None = None,
                 skip: Collection[str] = (), arguments: Collection[str] = (), comma: Collection[str] = (),
                 panels: Mapping[str, str] | None = None, replay: bool = True):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self.replay = replay
        self.arguments = tuple(arguments)
        decls = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in (flags or {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = (set(decls) | set(skip) | set(arguments) | set(comma) | set(panels or {})) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        self.settings: dict[str, Setting] = {
            f.name: _setting(f, hints[f.name], docs.get(f.name, ""), decls.get(f.name), f.name in comma)
            for f in dataclasses.fields(cls) if f.name not in skip}
        self.skipped = tuple(f.name for f in dataclasses.fields(cls) if f.name not in self.settings)
        """Fields set through --config only."""
        self.panel: dict[str, str | None] = {}
        """Field -> its --help panel (None: typer's "Options")."""
        current = None
        for f in dataclasses.fields(cls):
            current = (panels or {}).get(f.name, current)
            self.panel[f.name] = current

    @property
    def names(self) -> tuple[str, ...]:
        """The fields that have an option (or argument)."""
        return tuple(self.settings)

    def parameters(self) -> list[inspect.Parameter]:
        """typer parameters, one per setting, in field order (for a function's ``__signature__``)."""
        return [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=self._annotation(s),
                                  default=self._info(s)) for s in self.settings.values()]

    @staticmethod
    def _annotation(s: Setting) -> Any:
        if s.kind == "list":
            return list[str]
        if s.kind == "bool":
            return bool
        if s.kind in ("int", "float") and not s.optional:
            return int if s.kind == "int" else float
        return str  # str, choices and optional numbers are parsed by Given (one message style)

    def _info(self, s: Setting) -> Any:
        text = _escape(s.help)
        if s.kind == "choice":
            text += f" One of: {', '.join(s.choices)}."
        if s.optional:
            text += " Give 'none' for None."
        if s.kind == "list":
            text += " Repeatable" + (" or comma-separated" if s.comma else "") + ("." if s.required else "; '' for none.")
        if s.required and self.replay:
            text += " Required (or --config FILE)."
        metavar = None  # typer's: <int>, <float>, <str>; choices go in the help, where they wrap
        if s.kind == "choice":
            metavar = "CHOICE"
        elif s.kind in ("int", "float", "str") and s.optional:
            metavar = f"{_METAVARS[s.kind]}|none"
        elif s.kind == "list":
            metavar = _METAVARS[s.item]
        # The typer default only shows in --help: values the user did not type are never used.
        default: Any = s.default
        if s.required:
            default = None if self.replay else ...
        elif default is None:
            default = None
        elif s.kind == "list":
            default = [_shown(v) for v in default] or None
        elif s.kind in ("str", "choice"):
            default = _shown(default)
        if s.name in self.arguments:
            return typer.Argument(default, help=text, metavar=s.name.upper(), show_default=not s.required
                                  and default is not None, rich_help_panel=self.panel[s.name])
        return typer.Option(default, *s.decls, help=text, metavar=metavar, show_default=not s.required
                            and default is not None, rich_help_panel=self.panel[s.name])

    def given(self, ctx: typer.Context, raw: Mapping[str, Any]) -> Given[C]:
        """What the user typed (by typer's parameter source), converted to the fields' types."""
        values: dict[str, Any] = {}
        for name, value in raw.items():
            source = ctx.get_parameter_source(name)
            if source is None or source.name not in _GIVEN:
                continue
            values[name] = self._convert(self.settings[name], value)
        return Given(self, values)

    def _convert(self, s: Setting, value: Any) -> Any:
        def number(text: str, kind: Kind) -> Any:
            try:
                return int(text) if kind == "int" else float(text)
            except ValueError:
                noun = "an integer" if kind == "int" else "a number"
                raise ConfigError(f"{s.option}: {s.name}={text!r}: not {noun}") from None

        if s.kind == "list":
            items = [str(v) for v in value]
            if s.comma:
                items = [p for p in (p.strip() for v in items for p in v.split(",")) if p]
            if items in ([], [""], ["none"]):
                return ()
            return tuple(v if s.item == "str" else number(v, s.item) for v in items)
        if s.optional and isinstance(value, str) and value.strip().lower() == "none":
            return None
        if s.kind == "choice" and value not in s.choices:
            raise ConfigError(f"{s.option}: {s.name}={value!r}: use one of {', '.join(s.choices)}")
        if s.kind in ("int", "float") and isinstance(value, str):
            return number(value, s.kind)
        return value

    def explain(self, exc: Exception) -> str:
        """A config error's message, led by the option of the field it names first."""
        msg = str(exc)
        found = []
        for name, s in self.settings.items():
            m = re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", msg)
            if m:
                found.append((m.start(), -len(name), s))
        if not found:
            return msg
        s = min(found, key=lambda t: (t[0], t[1]))[2]
        where = s.name.upper() if s.name in self.arguments else s.option
        return f"{where}: {msg}"

    def missing(self, data: Mapping[str, Any]) -> list[str]:
        """The required settings ``data`` lacks, as the user would type them."""
        return [s.name.upper() if s.name in self.arguments else s.option
                for s in self.settings.values() if s.required and s.name not in data]


class Given(Generic[C]):
    """The settings a user typed for one config class, and the config they make."""

    def __init__(self, options: ConfigOptions[C], values: dict[str, Any]):
        self.options = options
        self.values = values
        """Field -> value, for the options given on the command line only."""

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def config(self, base: C | Mapping[str, Any] | None = None) -> C:
        """``base`` (a config, a dict of typed field values, or the defaults) with the typed settings applied.

        Raises ConfigError naming the option when a required setting is missing or the
        config's validation refuses a value.
        """
        cls = self.options.cls
        if dataclasses.is_dataclass(base) and not isinstance(base, type):
            def build() -> C:
                return dataclasses.replace(base, **self.values)  # type: ignore[type-var, arg-type]
        else:
            data = {**(base or {}), **self.values}  # type: ignore[dict-item]
            missing = self.options.missing(data)
            if missing:
                raise ConfigError(f"missing {', '.join(missing)} (or replay a saved config with --config FILE)")

            def build() -> C:
                return cls(**data)  # values are typed already; the base names fields only
        try:
            return build()
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise ConfigError(self.options.explain(exc)) from exc

    def resolve(self, config: str | Path | None,
                load: Callable[[type[C], str | Path], C] | None = None) -> C:
        """The effective config: the file saved with ``--save-config`` (if given), then the typed settings."""
        base = None
        if config is not None:
            try:
                base = (load or load_config)(self.options.cls, config)
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:  # the file's values fail the config's validation
                raise ConfigError(f"--config {config}: {exc}") from exc
        return self.config(base)


def config_command(func: Callable[..., Any], options: ConfigOptions[Any]) -> Callable[..., Any]:
    """A typer command: ``func``'s own parameters plus one option per setting of ``options``.

    ``func`` takes ``settings`` (a :class:`Given`), optionally ``ctx`` (the typer context),
    and its own typer parameters (positional arguments, ``--config``, ``--progress`` ...),
    declared as usual with ``typer.Option``/``typer.Argument`` defaults.
    """
    sig = inspect.signature(func)  # the annotation of `settings` may name a class imported for type checking only
    if "settings" not in sig.parameters:
        raise TypeError(f"{func.__name__} must take a 'settings' parameter")
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=_evaluated(p.annotation, func))
           for n, p in sig.parameters.items() if n not in ("settings", "ctx")]
    clash = {p.name for p in own} & set(options.names)
    if clash:
        raise TypeError(f"{func.__name__}: parameter(s) {sorted(clash)} clash with {options.cls.__name__} fields")
    wants_ctx = "ctx" in sig.parameters
    derived = options.parameters()

    def is_argument(p: inspect.Parameter) -> bool:
        return isinstance(p.default, typer.models.ArgumentInfo)

    # positional arguments first (derived, then the verb's), then the settings, then the verb's options
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              *[p for p in derived if is_argument(p)], *[p for p in own if is_argument(p)],
              *[p for p in derived if not is_argument(p)], *[p for p in own if not is_argument(p)]]

    def command(ctx: typer.Context, **kwargs: Any) -> Any:
        raw = {name: kwargs.pop(name) for name in options.names}
        if wants_ctx:
            kwargs["ctx"] = ctx
        try:
            settings = options.given(ctx, raw)
        except ConfigError as exc:
            fail(exc)
        return func(settings=settings, **kwargs)

    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(command, attr, getattr(func, attr))
    command.__annotations__ = {}  # typer reads the types from the signature below
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def _evaluated(annotation: Any, func: Callable[..., Any]) -> Any:
    """A parameter's annotation as a type (under ``from __future__ import annotations`` it is a string)."""
    if isinstance(annotation, str):
        return eval(annotation, func.__globals__)  # as inspect.signature(eval_str=True) does
    return annotation


def fail(exc: Exception | str, code: int = 2) -> NoReturn:
    """Print a config error as one line on stderr and exit with ``code``."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def save_effective(cfg: Any, path: str | Path | None) -> None:
    """``--save-config FILE``: write the effective config for a later ``--config FILE``."""
    if path is not None:
        save_config(cfg, path)


def _shown(value: Any) -> str:
    """A default as --help shows it: quoted when empty or not printable ('', '\\n')."""
    text = str(value)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def _escape(text: str) -> str:
    """A docstring as help text: reST markup plain, square brackets literal ("[x]" is no rich style tag)."""
    from rich.markup import escape

    text = re.sub(r":[a-z]+:`", "`", text.replace("``", "`"))  # reST roles read as plain code
    return escape(text)

