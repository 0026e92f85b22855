"""Append BibTeX entries from drafts/*.bib that book/references.bib lacks (by key).

python tools/merge_bib.py drafts/04_cnn.bib drafts/05_lstm.bib
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIB = ROOT / "book" / "references.bib"
ENTRY = re.compile(r"@\w+\s*\{\s*([^,\s]+)\s*,.*?\n\}", re.S)


def main(paths: list[str]) -> None:
    text = BIB.read_text()
    known = set(m.group(1) for m in ENTRY.finditer(text))
    added = []
    for path in paths:
        for match in ENTRY.finditer(Path(path).read_text()):
            key = match.group(1)
            if key not in known:
                known.add(key)
                added.append(key)
                text = text.rstrip("\n") + "\n" + match.group(0) + "\n"
    BIB.write_text(text)
    print(f"added {len(added)}: {', '.join(added)}")


if __name__ == "__main__":
    main(sys.argv[1:])
