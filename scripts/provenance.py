"""Which committed runs can say what produced them.

Every run under ``docs/results/`` should carry ``environment.jsonl`` naming the commit
it ran at, and that commit should be in this repository's history (a run that names a
commit later rewritten away cannot be traced to its code). This script walks every
finished run (a folder with ``summary.json``) and every saved benchmark record (a JSON
file with an ``environment``), and prints, per study folder, how many runs there are,
how many record their environment, and which named commits git does not know.

    .venv/bin/python scripts/provenance.py     # the table on docs/results/index.md
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

from sfedlora.studies import runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs/results"


def _study(path: Path) -> str:
    """The study a run or record belongs to: at most the first two folders of its path
    under ``docs/results/`` before any ``runs/`` (``methods/sst2-gpu``, ``demo``)."""
    parts = path.relative_to(RESULTS).parent.parts
    if "runs" in parts:
        parts = parts[:parts.index("runs")]
    return "/".join(parts[:2])


def _commits_of_run(run: Path) -> set[str | None]:
    return {runs.commit(record) for record in runs.environments(run)}


def _commits_of_record(path: Path) -> set[str | None] | None:
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or "environment" not in record:
        return None
    return {(record["environment"].get("source") or {}).get("commit")}


def audit() -> dict[str, dict]:
    """Per study folder: runs and records, how many name their environment, and the
    commits they name that are not in the history (None: named no commit)."""
    found: dict[str, dict] = defaultdict(lambda: {"runs": 0, "recorded": 0, "commits": set()})
    for summary in sorted(RESULTS.rglob("summary.json")):
        row = found[_study(summary)]
        commits = _commits_of_run(summary.parent)
        row["runs"] += 1
        row["recorded"] += bool(commits)
        row["commits"] |= commits
    for path in sorted(RESULTS.rglob("*.json")):
        if path.name in ("summary.json", "labels.json") or "/runs/" in path.as_posix():
            continue
        if (commits := _commits_of_record(path)) is not None:
            row = found[_study(path)]
            row["runs"] += 1
            row["recorded"] += 1
            row["commits"] |= commits
    for row in found.values():
        row["unknown"] = sorted((c or "none") for c in row.pop("commits") if not _known(c))
    return dict(sorted(found.items()))


def _known(commit: str | None) -> bool:
    if not commit:
        return False
    done = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True, check=False)
    return done.returncode == 0


def table() -> str:
    rows = ["| study folder | runs and records | with their environment | commits not in the "
            "history |", "|---|---|---|---|"]
    for folder, row in audit().items():
        unknown = ", ".join(c[:10] for c in row["unknown"]) or "-"
        rows.append(f"| `{folder}` | {row['runs']} | {row['recorded']} | {unknown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
