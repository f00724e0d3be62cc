"""The documentation site: it builds offline in strict mode (a broken link, a missing
page or an unresolvable API reference fails), its generated reference pages match the
code, and nothing a user reads points outside the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, import_benchmark

# What a clone holds and a user reads: README, the site's pages, the shipped configs.
READ_BY_USERS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml")),
                 *sorted(p for p in (ROOT / "docs").rglob("*.md")
                         if not any(part == "runs" for part in p.parts))]


def test_the_generated_reference_pages_match_the_code():
    reference = import_benchmark("docs_reference", folder="scripts")
    for key, text in reference.generated().items():
        assert reference.PAGES[key].read_text() == text, (
            f"{reference.PAGES[key]} differs from the code: run `make docs`")


def test_the_config_reference_lists_every_key_of_the_schema():
    """An independent walk of the schema: every leaf key is a row of the page."""
    from pydantic import BaseModel

    from sfedlora.settings import ExperimentConfig

    def leaves(model, prefix=""):
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from leaves(kind, f"{prefix}{name}.")
            else:
                yield prefix + name

    page = (ROOT / "docs/reference/config.md").read_text()
    rows = set(re.findall(r"^\| `([\w.]+)` \|", page, flags=re.M))
    assert set(leaves(ExperimentConfig)) <= rows
    assert {"options.keep", "options.train_head", "options.grid"} <= rows  # method options


@pytest.mark.slow
def test_the_site_builds_offline_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "WARNING" not in build.stderr
    api = (tmp_path / "site/reference/python-api/index.html").read_text()
    assert "sfedlora.api.run" in api and ":class:" not in api  # rendered, roles resolved
    assert (tmp_path / "site/methods/sfed/index.html").is_file()


def test_nothing_a_user_reads_points_outside_the_repository():
    for path in READ_BY_USERS:
        text = path.read_text()
        assert "../shared" not in text and "METHODS.md" not in text, path


def test_the_readme_is_a_front_page_not_a_manual():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 160
    assert readme[2:6] == ["```bash", "make demo", "make test", "```"]


def test_every_link_in_the_readme_resolves_in_a_clone():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    assert targets
    for target in targets:
        assert target.startswith("http") or (ROOT / target).exists(), target


def test_the_main_job_tables_regenerate_from_its_committed_runs(monkeypatch):
    """docs/results/demo.md shows ``demo.py --report`` of its committed runs (named by
    their paths from the repository's root, as the page's command gives them)."""
    module = import_benchmark("demo")
    monkeypatch.chdir(ROOT)
    runs = [ROOT.relative_to(ROOT) / "docs/results/demo/runs" / name
            for name in ("sfed", "sfed-parallel10", "fedsa-independent-a", "sfed-clean-clone")]
    assert module.report(runs) in (ROOT / "docs/results/demo.md").read_text()


def test_the_batched_results_tables_regenerate_from_their_saved_rows():
    """docs/results/batched.md shows ``batched.py --report`` of its saved rows."""
    module = import_benchmark("batched")
    saved = [ROOT / "docs/results/batched" / f"{name}.json"
             for name in ("minilm", "smollm2", "minilm-sgd")]
    assert module.report(saved) in (ROOT / "docs/results/batched.md").read_text()


def test_the_flower_results_tables_regenerate_from_their_saved_rows():
    """docs/results/flower.md shows ``flower_overhead.py --report`` of its saved rows."""
    module = import_benchmark("flower_overhead")
    page = (ROOT / "docs/results/flower.md").read_text()
    for names in (("minilm-runtime", "smollm2-runtime"), ("minilm", "smollm2"),
                  ("minilm-slots-only", "minilm-less-polling"),
                  ("minilm-2026-12-06", "smollm2-2026-12-06")):
        saved = [ROOT / "docs/results/flower" / f"{name}.json" for name in names]
        assert module.report(saved) in page
    cpu = import_benchmark("process_cpu")
    for name in ("cpu-deployment", "cpu-runtime"):
        saved = json.loads((ROOT / f"docs/results/flower/{name}.json").read_text())
        assert cpu.report(saved, (2, 3)) in page


def test_process_cpu_counts_each_process_within_the_window_only():
    """An exact check of the CPU profile's arithmetic on made-up samples."""
    cpu = import_benchmark("process_cpu")
    seen = {"1@0": {"kind": "a", "born": 0.0, "first": [5.0, 2.0], "last": [15.0, 12.0]},
            "2@9": {"kind": "a", "born": 9.0, "first": [9.5, 0.2], "last": [11.0, 1.0]},
            "3@0": {"kind": "b", "born": 0.0, "first": [1.0, 0.0], "last": [2.0, 1.0]}}
    # process 1: 10 CPU s over 10 s, 5 s of them in [10, 20]; process 2 counts from its
    # birth at 9: 1 CPU s over 2 s, 1 s of it in the window; process 3 ended before
    assert cpu.cpu_by_kind(seen, 10.0, 20.0) == {"a": (5.0 + 0.5, 2)}


def test_the_provenance_table_regenerates_from_the_committed_runs():
    """docs/results/index.md shows ``scripts/provenance.py``'s audit of every run."""
    module = import_benchmark("provenance", folder="scripts")
    assert module.table() in (ROOT / "docs/results/index.md").read_text()


def test_every_planned_studys_report_regenerates_and_follows_its_plan():
    """Each study run by a committed plan (``sfedlora study``): its ``report.md`` is
    what its runs give now, and says the plan's commit precedes every run's."""
    from sfedlora.studies.protocol import PlannedStudy

    reports = sorted((ROOT / "docs/results").rglob("report.md"))
    planned = [r for r in reports if (r.parent / "plan.yaml").is_file()]
    for report in planned:
        study = PlannedStudy.load(report.parent / "plan.yaml", root=ROOT)
        text = report.read_text()
        assert study.page() == text, f"{report}: rerun `sfedlora study ... --stage decide`"
        assert "The plan's commit precedes every run's: yes." in text, report


QUOTED = re.compile(r"<!-- quoted from (\S+/report\.md) -->\n\n((?:\|.*\n)+)")


def test_tables_quoted_from_a_planned_studys_report_are_in_it():
    """A results page quotes a planned study's tables (arms, verdicts) below a marker
    ``<!-- quoted from <study>/report.md -->``; each quoted table must be in that report
    as committed, which the test above regenerates from the runs."""
    quoted = [(page, m) for page in sorted((ROOT / "docs/results").glob("*.md"))
              for m in QUOTED.finditer(page.read_text())]
    assert quoted, "no page quotes a study report; the marker's spelling changed?"
    for page, match in quoted:
        report = page.parent / match.group(1)
        assert match.group(2) in report.read_text(), \
            f"{page.name}: a table quoted from {match.group(1)} differs from the report"


def test_the_overhead_and_gsm8k_tables_regenerate_from_their_records(monkeypatch):
    """docs/results/overhead.md and gsm8k.md show their benchmarks' --report of the
    committed records, and the GSM8K run's table (``demo.py --report``)."""
    from sfedlora.studies import runs

    overhead, throughput = import_benchmark("overhead"), import_benchmark("lm_throughput")
    page = (ROOT / "docs/results/overhead.md").read_text()
    assert overhead.render(runs.read_record(ROOT / "docs/results/overhead/overhead.json")) \
        in page
    page = (ROOT / "docs/results/gsm8k.md").read_text()
    record = runs.read_record(ROOT / "docs/results/gsm8k/lm_throughput.json")
    assert throughput.render(record) in page
    monkeypatch.chdir(ROOT)
    assert import_benchmark("demo").report([Path("docs/results/gsm8k/runs/smollm2")]) in page


def test_the_batched_sweep_table_regenerates_from_its_saved_measurement():
    """docs/results/batched.md shows ``batched_sweep.py --report`` of its saved timing."""
    module = import_benchmark("batched_sweep")
    saved = [ROOT / "docs/results/batched/sweep-cpu.json"]
    assert module.report(saved) in (ROOT / "docs/results/batched.md").read_text()
