"""Merge glossary entries from drafts/*_glossary.md into book/glossary.md (sorted, by term).

    python tools/merge_glossary.py drafts/09_glossary.md drafts/12_glossary.md

An entry is a term line ``English (中文)`` followed by indented definition lines; an entry
whose English term the glossary already has is left out.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLOSSARY = ROOT / "book" / "glossary.md"
BLOCK = re.compile(r"(```\{glossary\}\n)(.*?)(\n```)", re.S)


def entries(text: str) -> dict[str, str]:
    """Map of lower-cased English term -> the entry's text (term line plus definition)."""
    found: dict[str, str] = {}
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in chunk.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "`", "#")):
            continue
        found[lines[0].split(" (")[0].strip().lower()] = "\n".join(lines)
    return found


def main(paths: list[str]) -> None:
    text = GLOSSARY.read_text()
    match = BLOCK.search(text)
    if match is None:
        raise SystemExit("book/glossary.md has no ```{glossary} block")
    known = entries(match.group(2))
    added = []
    for path in paths:
        for key, entry in entries(Path(path).read_text()).items():
            if key not in known:
                known[key] = entry
                added.append(entry.splitlines()[0])
    body = "\n\n".join(known[k] for k in sorted(known))
    GLOSSARY.write_text(text[: match.start(2)] + body + text[match.end(2) :])
    print(f"added {len(added)}: {'; '.join(added)}")


if __name__ == "__main__":
    main(sys.argv[1:])
