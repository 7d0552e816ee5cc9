"""The HTTP API reference (docs/api.md) rendered from an OpenAPI document: the app's own, or a live ``/openapi.json``.

``python -m serving.runtime.reference --out docs/api.md`` renders the app's document (serving.runtime.router's
``api``, with serving/runtime/openapi_docs.py applied); ``--url http://HOST:PORT`` renders a running app's instead.
``render`` is a pure function of the document, so the committed page can be checked against a live app.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.runtime.openapi_docs import REGENERATE, operations

_METHOD_ORDER = {"get": 0, "post": 1, "put": 2, "patch": 3, "delete": 4}


def _cell(text) -> str:
    """Text for one Markdown table cell (no line breaks, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _resolve(schema: dict, document: dict) -> dict:
    ref = schema.get("$ref")
    if not ref or not ref.startswith("#/"):
        return schema
    found = document
    for part in ref[2:].split("/"):
        found = found.get(part, {})
    return found


def _type(schema: dict, document: dict) -> str:
    """A short type name of a JSON schema: ``string``, ``array of number``, ``"json" | "stac"``..."""
    schema = _resolve(schema, document)
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        kinds = [_type(s, document) for s in schema.get("anyOf", schema.get("oneOf", []))]
        return " or ".join(k for k in kinds if k != "null") or "null"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), document)}"
    if schema.get("format") == "binary":
        return "file"
    limits = [f"{name} {schema[key]}" for key, name in (("minimum", ">="), ("maximum", "<="), ("exclusiveMinimum", ">"))
              if key in schema]
    return f"{kind} ({', '.join(limits)})" if limits else kind


def _fields(schema: dict, document: dict) -> list[str]:
    schema = _resolve(schema, document)
    properties = schema.get("properties", {})
    if not properties:
        return [f"A `{_type(schema, document)}`."]
    required = set(schema.get("required", ()))
    rows = ["| field | type | required | description |", "|---|---|---|---|"]
    for name, prop in properties.items():
        description = prop.get("description") or _resolve(prop, document).get("description", "")
        if "default" in prop and prop["default"] is not None:
            description = f"{description} (default {json.dumps(prop['default'])})".strip()
        rows.append(f"| `{name}` | {_cell(_type(prop, document))} | {'yes' if name in required else 'no'} | "
                    f"{_cell(description)} |")
    return rows


def _access(operation: dict) -> str:
    permission, roles = operation.get("x-terrahash-permission"), operation.get("x-terrahash-roles", [])
    if permission is None:
        return "Open to anyone: no key needed (with auth on, a key may add detail)."
    return f"Needs permission `{permission}`: roles {', '.join(f'`{r}`' for r in roles)}."


def _request_headers(operation: dict) -> list[str]:
    optional = {} in operation.get("security", [])
    rows = ["| header | description |", "|---|---|",
            f"| `Authorization` | `Bearer KEY`, {'optional' if optional else 'required when the deployment has auth on'} |"]
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "header":
            rows.append(f"| `{parameter['name']}` | {_cell(parameter.get('description', ''))} |")
    return rows


def _parameters(operation: dict, document: dict) -> list[str]:
    found = [p for p in operation.get("parameters", []) if p.get("in") in ("path", "query")]
    if not found:
        return []
    rows = ["**Parameters**", "", "| name | in | type | required | description |", "|---|---|---|---|---|"]
    for p in found:
        rows.append(f"| `{p['name']}` | {p['in']} | {_cell(_type(p.get('schema', {}), document))} | "
                    f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |")
    return [*rows, ""]


def _body(operation: dict, document: dict) -> list[str]:
    content = operation.get("requestBody", {}).get("content", {})
    out = []
    for media, entry in content.items():
        out += [f"**Request body** `{media}`", "", *_fields(entry.get("schema", {}), document), ""]
    return out


def _answer(operation: dict) -> list[str]:
    ok = operation.get("responses", {}).get("200", {})
    out = []
    for media, entry in ok.get("content", {}).items():
        out.append(f"**Answer** `200` `{media}`. {ok.get('description', '')}".rstrip())
        for name, header in ok.get("headers", {}).items():
            out.append(f"Header `{name}`: {header.get('description', '')}.")
        example = entry.get("example")
        if example is not None:
            if isinstance(example, str):
                out += ["", example]
            else:
                out += ["", "```json", json.dumps(example, indent=2), "```"]
        out.append("")
    return out


def _errors(operation: dict) -> list[str]:
    rows = []
    for status, response in operation.get("responses", {}).items():
        codes = response.get("x-terrahash-error-codes")
        if not codes:
            continue
        headers = ", ".join(f"`{h}`" for h in response.get("headers", {}))
        rows.append(f"| {status} | {', '.join(f'`{c}`' for c in codes)} | {headers} |")
    if not rows:
        return []
    return ["**Errors**", "", "| status | codes | headers |", "|---|---|---|", *rows, ""]


def _sorted_operations(document: dict):
    return sorted(operations(document), key=lambda item: (item[0].split(" ", 1)[1], _METHOD_ORDER.get(
        item[0].split(" ", 1)[0].lower(), 9)))


def _anchor(key: str) -> str:
    return "".join(ch for ch in key.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def render(document: dict) -> str:
    """docs/api.md of an OpenAPI document with serving/runtime/openapi_docs.py applied."""
    info = document.get("info", {})
    ops = _sorted_operations(document)
    lines = [f"# {info.get('title', 'API')} (HTTP API, version {info.get('version', '?')})", "",
             f"<!-- Rendered from the app's /openapi.json by `{REGENERATE}`: edit the routes' docstrings, "
             "serving/runtime/api.py (request bodies) or serving/runtime/openapi_docs.py (permissions, examples, "
             "errors), then run it again. -->", "",
             info.get("description", ""), "",
             "The same document is served live at `/openapi.json` (and as pages at `/docs`); the extensions "
             "`x-terrahash-permission`, `x-terrahash-roles`, `x-terrahash-endpoint` and `x-terrahash-error-codes` "
             "carry what this page shows.", "",
             "## Authentication and roles", ""]
    for name, scheme in sorted(document.get("components", {}).get("securitySchemes", {}).items()):
        lines += [f"`{name}` ({scheme.get('type')}, {scheme.get('scheme')}): {scheme.get('description', '')}", ""]
    lines += ["| method and path | permission | roles |", "|---|---|---|"]
    for key, op in ops:
        permission = op.get("x-terrahash-permission")
        lines.append(f"| [`{key}`](#{_anchor(key)}) | {f'`{permission}`' if permission else 'none'} | "
                     f"{', '.join(op.get('x-terrahash-roles', []))} |")
    lines += ["", "## Headers", "",
              "| header | direction | meaning |", "|---|---|---|",
              "| `Authorization` | request | `Bearer KEY`, when the deployment has auth on |"]
    seen = {}
    for _, op in ops:
        for p in op.get("parameters", []):
            if p.get("in") == "header":
                seen.setdefault(("request", p["name"]), p.get("description", ""))
        for response in op.get("responses", {}).values():
            for name, header in response.get("headers", {}).items():
                seen.setdefault(("answer", name), header.get("description", ""))
    for (direction, name), description in sorted(seen.items(), key=lambda x: (x[0][0] != "request", x[0][1])):
        lines.append(f"| `{name}` | {direction} | {_cell(description)} |")
    lines += ["", "## Errors", "",
              'Every answer other than 200 is JSON: `{"error": {"code": "...", "message": "..."}}` (a 500 adds '
              '`"request_id"`). Clients should branch on `code`, which is stable; `message` is for people.', "",
              "| code | status | when |", "|---|---|---|"]
    for code, entry in document.get("x-terrahash-errors", {}).items():
        lines.append(f"| `{code}` | {', '.join(map(str, entry['statuses']))} | {_cell(entry['when'])} |")
    lines += ["", "## Endpoints", ""]
    for key, op in ops:
        lines += [f"### {key}", ""]
        if op.get("description"):
            lines += [" ".join(op["description"].split()), ""]
        lines += [_access(op), "", "**Request headers**", "", *_request_headers(op), "",
                  *_parameters(op, document), *_body(op, document), *_answer(op), *_errors(op)]
    return "\n".join(lines).rstrip() + "\n"


def app_document() -> dict:
    """The app's OpenAPI document (what a running app serves at /openapi.json)."""
    from serving.runtime.router import api

    return api.openapi()


def fetch_document(url: str) -> dict:
    """A running app's ``/openapi.json`` (``url``: its base URL)."""
    import urllib.request

    with urllib.request.urlopen(f"{url.rstrip('/')}/openapi.json", timeout=30) as answer:
        return json.loads(answer.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.runtime.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    parser.add_argument("--url", help="render a running app's /openapi.json (its base URL) instead of the app's own")
    args = parser.parse_args(argv)
    text = render(fetch_document(args.url) if args.url else app_document())
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
