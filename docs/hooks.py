"""mkdocs hooks: reference pages generated from the code at build time.

- ``reference/cli.md`` from the Typer app (``typer.main.get_command``): every command,
  its usage, arguments and options with their help texts and defaults;
- ``reference/configuration.md`` from the typed params (``visionops.config.Params``):
  every key with its type, default, constraints and description (the pydantic
  ``description``, else the comment beside the key in ``params.yaml``);
- ``reference/http-api.md`` from the service's OpenAPI schema;
- ``contributing.md`` from the repository's ``CONTRIBUTING.md``.

Nothing generated is written into ``docs/``: the pages exist only in the built site, so
they cannot go stale. The functions are plain and importable (the tests call them).
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _cell(text: Any) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _html_escape(text: str) -> str:
    """Help texts such as ``<report name>`` are prose, not HTML tags."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------- CLI


def _param_row(param: Any, ctx: Any) -> str | None:
    if getattr(param, "hidden", False) or param.name == "help":
        return None
    record = param.get_help_record(ctx)  # what `--help` shows: names and help with default
    if record is None:
        return None
    names, help_text = record
    if param.param_type_name == "argument":
        names = names.upper()
    return f"| `{_cell(names)}` | {_html_escape(_cell(help_text))} |"


def _subcommands(cmd: Any, ctx: Any) -> list[tuple[str, Any]]:
    if not hasattr(cmd, "list_commands"):
        return []
    subs = [(name, cmd.get_command(ctx, name)) for name in cmd.list_commands(ctx)]
    return [(name, sub) for name, sub in subs if sub is not None and not sub.hidden]


def command_paths() -> list[str]:
    """Every command of the CLI, ``visionops`` first, depth first."""
    import typer

    from visionops.cli import app

    out: list[str] = []

    def walk(cmd: Any, path: list[str], parent: Any) -> None:
        ctx = typer.Context(cmd, info_name=path[-1], parent=parent)
        out.append(" ".join(path))
        for name, sub in _subcommands(cmd, ctx):
            walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["visionops"], None)
    return out


def cli_markdown() -> str:
    """The CLI reference: every command of ``visionops``, depth first."""
    import typer

    from visionops.cli import app

    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app (`visionops.cli`) when the site is built. Every",
        "command also answers `--help`. Commands that read params take `--params FILE`",
        "and repeated `--set key=value` ([configuration](configuration.md)).",
        "",
    ]

    # Typer ships its own copy of click: duck typing, no isinstance on click classes.
    def walk(cmd: Any, path: list[str], parent: Any) -> None:
        ctx = typer.Context(cmd, info_name=path[-1], parent=parent)
        full = " ".join(path)
        if parent is not None:
            lines.extend([f"## `{full}`", ""])
        help_text = (cmd.help or "").strip()
        if help_text:
            lines.extend([help_text, ""])
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines.extend(["```", f"{full} {usage}".rstrip(), "```", ""])
        rows = [r for p in cmd.params if (r := _param_row(p, ctx))]
        if rows:
            lines.extend(["| argument or option | help |", "|---|---|", *rows, ""])
        subs = _subcommands(cmd, ctx)
        if subs:
            lines.extend(["| command | what it does |", "|---|---|"])
            lines.extend(
                f"| [`{full} {n}`](#{_anchor(f'{full} {n}')}) | "
                f"{_cell(c.get_short_help_str(limit=120))} |"
                for n, c in subs
            )
            lines.append("")
        for name, sub in subs:
            walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["visionops"], None)
    return "\n".join(lines)


def _anchor(title: str) -> str:
    """The id Python-Markdown's toc extension gives a heading like ``visionops train``."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower())


# --------------------------------------------------------------------------- params


def params_yaml_comments(path: Path) -> dict[str, str]:
    """``{"data.source": "mnist | cifar10 | imagefolder", ...}`` from a params.yaml's
    end-of-line comments (two-space indentation per section level)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        value, _, comment = rest.partition(" #")
        if comment.strip():
            comments[dotted] = comment.strip()
        if not value.strip():
            stack.append((indent, key))
    return comments


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least"}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}" + (" item(s)" if attr == "min_length" else ""))
    return ", ".join(parts)


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return f"`{json.dumps(value, default=_jsonable)}`"


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # nested pydantic models
    return dump(mode="json", exclude_defaults=True) if dump else str(value)


def config_markdown() -> str:
    """The configuration reference: every key of ``params.yaml``, from the typed params."""
    from pydantic import BaseModel

    from visionops.config import Params

    params_file = REPO / "params.yaml"
    comments = params_yaml_comments(params_file) if params_file.exists() else {}
    lines = [
        "# Configuration reference",
        "",
        "Generated from the typed params (`visionops.config.Params`) when the site is",
        "built. `params.yaml` holds every key below; unknown or mistyped keys are errors",
        "that name the key. Override any of them for one command with",
        "`--set section.key=value`, or for a tracked experiment with",
        "`dvc exp run -S section.key=value`. Where things live (tracking server,",
        "databases, tokens) comes from the [environment](environment.md) instead.",
        "",
    ]
    header = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]

    def row(dotted: str, field: Any) -> str:
        description = field.description or comments.get(dotted, "")
        return (
            f"| `{dotted}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} "
            f"| {_cell(_constraints(field))} | {_cell(description)} |"
        )

    top = []
    sections = []
    for name, field in Params.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation))
        else:
            top.append(row(name, field))
    if top:
        lines.extend(["## Top level", "", *header, *top, ""])
    for name, model in sections:
        lines.extend([f"## `{name}`", ""])
        doc = (model.__doc__ or "").strip()
        if doc:
            lines.extend([doc, ""])
        lines.extend(header)
        lines.extend(row(f"{name}.{key}", f) for key, f in model.model_fields.items())
        lines.append("")
    if params_file.exists():
        lines.extend(
            ["## The shipped `params.yaml`", "", "```yaml", params_file.read_text().rstrip(), "```"]
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTTP API


def http_api_markdown() -> str:
    """Every route of the service, from its OpenAPI schema."""
    from visionops.serve.app import create_app
    from visionops.serve.service import ServeSettings

    schema = create_app(ServeSettings(model_uri="unused")).openapi()
    lines = [
        "# HTTP API reference",
        "",
        f"Generated from the OpenAPI schema of the service ({schema['info']['title']} "
        f"{schema['info']['version']}) when the site is built; the running service serves",
        "it at `/openapi.json` and interactive docs at `/docs`. Examples and errors:",
        "[the HTTP API](../http-api.md).",
        "",
        "| method | route | summary | responses |",
        "|---|---|---|---|",
    ]
    details: list[str] = []
    for route, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            summary = op.get("summary", "")
            lines.append(f"| {method.upper()} | `{_cell(route)}` | {_cell(summary)} | {codes} |")
            details.extend([f"## {method.upper()} `{route}`", ""])
            if op.get("description"):
                details.extend([op["description"].strip(), ""])
            params = op.get("parameters", [])
            if params:
                details.extend(["| parameter | in | required | description |", "|---|---|---|---|"])
                details.extend(
                    f"| `{p['name']}` | {p['in']} | {str(p.get('required', False)).lower()} "
                    f"| {_cell(p.get('description', ''))} |"
                    for p in params
                )
                details.append("")
            for code, response in sorted(op.get("responses", {}).items()):
                details.append(f"- **{code}**: {_cell(response.get('description', ''))}")
            details.append("")
    return "\n".join([*lines, "", *details])


# --------------------------------------------------------------------------- pages


def contributing_markdown() -> str:
    """CONTRIBUTING.md, with its links rebased from the repository root to docs/."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    return text.replace("](docs/", "](")


GENERATED: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_markdown,
    "reference/configuration.md": config_markdown,
    "reference/http-api.md": http_api_markdown,
    "contributing.md": contributing_markdown,
}


def on_files(files: Any, config: Any) -> Any:
    """mkdocs event: add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    for uri, render in GENERATED.items():
        files.append(File.generated(config, uri, content=render()))
    return files
