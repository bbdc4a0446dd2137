# Two commands do everything on a fresh machine:
#   make demo   build the venv if missing, then convert and compare the embedded default model
#   make test   build the venv if missing, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.transmla-setup-done

.PHONY: demo test venv lint clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vllm_transmla.cli demo --workdir demo_out

test: $(STAMP)
	$(VENV)/bin/ruff check vllm_transmla tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check vllm_transmla tests benchmarks

clean:
	rm -rf demo_out .pytest_cache
