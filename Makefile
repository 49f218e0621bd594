# dogbreeds: two set-up commands, `make demo` and `make test`; both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench bench-accuracy bench-fleet bench-cost bench-report bench-memory report-screenshot clean check-infra container container-test soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py

bench-fleet: $(STAMP)
	$(BIN)/python benchmarks/fleet.py

bench-cost: $(STAMP)
	$(BIN)/python benchmarks/cost.py

bench-report: $(STAMP)
	$(BIN)/python benchmarks/report_size.py

# docs/report.png (the README's picture): the browser test's screenshot of its small run's report
report-screenshot: $(STAMP)
	DOGBREEDS_REPORT_SCREENSHOT=docs/report.png $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/integration/test_report.py -k chromium

bench-memory: $(STAMP)
	$(BIN)/python benchmarks/decode_memory.py

soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

lint: $(STAMP)
	$(BIN)/ruff check trainer worker benchmarks scripts infra tests

check-infra: $(STAMP)
	infra/check.sh

container:
	infra/container.sh build

container-test: $(STAMP)
	infra/container.sh test

clean:
	rm -rf $(VENV) .venv-tools build *.egg-info demo-output
