"""Keep config/README.md's table of every configuration key equal to the config schema, so no default there goes stale.

The table sits between two HTML comments in config/README.md:

    <!-- begin config table: workflow/scripts/config_table.py -->
    ...one row per key (dotted path, type, default, allowed values, description), written by this script...
    <!-- end config table -->

``python workflow/scripts/config_table.py`` rewrites it from src/carlrar/schemas/config.schema.json (``make
readme`` runs it); ``--check`` only reports a stale table (exit 1), which the test suite runs. A key without a
description is an error either way (exit 2): the table is where a user looks a key up, and the schema, which
also validates and fills the defaults, is the one place its meaning is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "src" / "carlrar" / "schemas" / "config.schema.json"
README = ROOT / "config" / "README.md"
BEGIN = "<!-- begin config table: workflow/scripts/config_table.py -->"
END = "<!-- end config table -->"
BLOCK = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
HEADER = "| Key | Type | Default | Allowed | Description |\n|---|---|---|---|---|\n"


class Undocumented(Exception):
    """Schema keys without a description."""


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """A node with its ``$ref`` (``#/$defs/...``) merged in; the node's own keywords (a description) win."""
    ref = node.get("$ref")
    if not ref:
        return node
    target = _resolve(root["$defs"][ref.rsplit("/", 1)[1]], root)
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _literal(value: Any) -> str:
    """A value as it is written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    return value if isinstance(value, str) else json.dumps(value)


def _is_section(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and ("properties" in node or isinstance(node.get("additionalProperties"), dict))


def _type(node: dict[str, Any], root: dict[str, Any]) -> str:
    if "oneOf" in node:
        return " or ".join(_type(_resolve(branch, root), root) for branch in node["oneOf"])
    if "const" in node:
        return f"`{_literal(node['const'])}`"
    if "enum" in node and "type" not in node:
        kinds = {type(v).__name__ for v in node["enum"]}
        return "string" if kinds == {"str"} else " or ".join(sorted(kinds))
    kinds = node.get("type", [])
    names = []
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind == "array":
            names.append(f"list of {_type(_resolve(node.get('items', {}), root), root)}")
        elif kind == "object":
            names.append("section" if _is_section(node) else "mapping")
        else:
            names.append(kind)
    return " or ".join(names) or "any"


def _bounds(node: dict[str, Any]) -> str:
    low = (f"[{_literal(node['minimum'])}", "≥") if "minimum" in node else None
    low = (f"({_literal(node['exclusiveMinimum'])}", ">") if "exclusiveMinimum" in node else low
    high = (f"{_literal(node['maximum'])}]", "≤") if "maximum" in node else None
    high = (f"{_literal(node['exclusiveMaximum'])})", "<") if "exclusiveMaximum" in node else high
    if low and high:
        return f"{low[0]}, {high[0]}"
    if low:
        return f"{low[1]} {low[0][1:]}"
    if high:
        return f"{high[1]} {high[0][:-1]}"
    return ""


def _allowed(node: dict[str, Any], root: dict[str, Any]) -> str:
    if "oneOf" in node:
        parts = [_allowed(_resolve(branch, root), root) for branch in node["oneOf"]]
        return " or ".join(p for p in parts if p)
    if "const" in node:
        return f"`{_literal(node['const'])}`"
    parts = []
    if "enum" in node:
        parts.append(", ".join(f"`{_literal(v)}`" for v in node["enum"]))
    if bound := _bounds(node):
        parts.append(bound)
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    if node.get("minLength"):
        parts.append("not empty")
    if node.get("maxLength"):
        parts.append(f"at most {node['maxLength']} characters")
    if "propertyNames" in node:
        parts.append("keys: " + ", ".join(f"`{v}`" for v in node["propertyNames"]["enum"]))
    if node.get("minProperties"):
        parts.append(f"at least {node['minProperties']}")
    if "items" in node:
        items = _allowed(_resolve(node["items"], root), root)
        if items:
            parts.append(f"each {items}")
        if node.get("minItems"):
            parts.append(f"at least {node['minItems']}")
        if node.get("maxItems"):
            parts.append(f"at most {node['maxItems']}")
        if node.get("uniqueItems"):
            parts.append("no repeats")
    return "; ".join(parts)


def _default(node: dict[str, Any], required: bool) -> str:
    if _is_section(node):
        return "required" if required else ""
    if "default" in node:
        return f"`{_literal(node['default'])}`"
    return "required" if required else "—"


def rows(schema: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """(key, type, default, allowed, description) for every key, depth first in the schema's order.

    Raises Undocumented naming every key whose schema node has no description.
    """
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str, required: bool) -> Iterator[tuple[str, ...]]:
        node = _resolve(node, schema)
        if path:
            description = " ".join(str(node.get("description", "")).split())
            if not description:
                missing.append(path)
            yield (path, _type(node, schema), _default(node, required), _allowed(node, schema), description)
        needed = set(node.get("required", []))
        for key, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{key}" if path else key, key in needed)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            yield from walk(extra, f"{path}.<{path.rsplit('.', 1)[-1].removesuffix('s')}>", False)

    yield from walk(schema, "", True)
    if missing:
        raise Undocumented(", ".join(missing))


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and "<" outside code spans, so that <dataset> is not read as an HTML tag."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "\\<") for p in parts).replace("|", "\\|")


def table(schema: dict[str, Any]) -> str:
    """The Markdown table of every key."""
    body = "".join(
        "| " + " | ".join(_cell(c) if i else f"`{c}`" for i, c in enumerate(row)) + " |\n" for row in rows(schema)
    )
    return HEADER + body


def render(readme: str, schema: dict[str, Any]) -> str:
    """The README text with its table block rewritten from the schema."""
    if not BLOCK.search(readme):
        raise ValueError(f"the README has no table block ({BEGIN} ... {END})")
    return BLOCK.sub(lambda _: f"{BEGIN}\n{table(schema)}{END}", readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report a stale table instead of rewriting it")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--schema", type=Path, default=SCHEMA)
    args = parser.parse_args(argv)
    try:
        schema = json.loads(args.schema.read_text(encoding="utf-8"))
        text = args.readme.read_text(encoding="utf-8")
        rendered = render(text, schema)
    except Undocumented as exc:
        print(f"config_table: {args.schema} has keys without a description: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"config_table: {args.schema} is not valid JSON: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"config_table: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # no table block
        print(f"config_table: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if rendered == text:
        return 0
    if args.check:
        print(
            f"config_table: the table in {args.readme} differs from {args.schema}; run `make readme`", file=sys.stderr
        )
        return 1
    args.readme.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
