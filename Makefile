# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fluxlora demo

test: $(STAMP)
	$(BIN)/ruff check fluxlora tests benchmarks
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $${PYTEST_WORKERS:-2} --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check fluxlora tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
