"""The configuration reference in the README, generated from config/guardproxy.yaml.

That file is the documented configuration: tests check that it loads to exactly the built-in defaults
and that it names every key the loader accepts, so a table generated from it (key path, default,
comment) cannot drift from the settings model. Run ``python -m guardproxy.config_reference`` to
print the table; tests compare it with the README's block."""

from __future__ import annotations

import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_CONTINUATION = re.compile(r"^ *#\s?(?P<comment>.*)$")


def rows(text: str) -> list[tuple[str, str, str]]:
    """(key path, default as written, comment) for every key of the documented file."""
    out: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            cont = _CONTINUATION.match(line)
            if cont and out and line.startswith(" " * 20):  # a comment continued under the last key
                path, value, comment = out[-1]
                out[-1] = (path, value, " ".join(f"{comment} {cont.group('comment')}".split()))
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group("key")])
        value = m.group("value").strip()
        if value:
            out.append((path, value, (m.group("comment") or "").strip()))
        else:
            stack.append((indent, m.group("key")))
            if m.group("comment"):
                out.append((path, "", m.group("comment").strip()))
    return out


def markdown(text: str) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for path, value, comment in rows(text):
        cell = f"`{value}`" if value else ""
        lines.append(f"| `{path}` | {cell} | {comment.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "config/guardproxy.yaml")
    print(markdown(path.read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()
