# The two commands of the README: `make demo` (set up, score sample data, open the dashboard) and
# `make test` (set up, run the suite). Both create .venv and install everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := results/demo
PORT   ?= 8501

.PHONY: setup system-packages demo demo-score test lint bench clean

# Debian packages: atlases and Colin27 (mricron-data), a browser for the end-to-end test, PostgreSQL.
system-packages:
	@bash scripts/system_packages.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dashboard,eval,postgres,distributed,dev,raw]'
	$(BIN)/pip install --quiet --no-deps deepbet==1.0.2 antspyx==0.6.3 pydeface==2.1.0
	touch $(STAMP)

setup: system-packages $(STAMP)

demo-score: setup
	$(BIN)/anomaly sample-data data/sample
	$(BIN)/anomaly calibrate --db $(DEMO)/anomaly.db --healthy data/sample/calibration --name demo \
		--target-fpr 0.001 --scan-target-fpr 0.2
	$(BIN)/anomaly score data/sample/lesions data/sample/healthy --out $(DEMO)/maps --db $(DEMO)/anomaly.db \
		--calibration demo --csv $(DEMO)/scores.csv
	$(BIN)/anomaly evaluate --db $(DEMO)/anomaly.db --run latest --labels data/sample/labels \
		--healthy-without-labels --out $(DEMO)/evaluation
	@echo
	@echo "demo results: maps in $(DEMO)/maps, scores in $(DEMO)/scores.csv,"
	@echo "  evaluation in $(DEMO)/evaluation (summary.json, ROC/PR/Dice plots), database $(DEMO)/anomaly.db"

demo: demo-score
	$(BIN)/anomaly dashboard --db $(DEMO)/anomaly.db --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

# ruff, then mypy over anomaly, pipelines and dashboard (configured in pyproject.toml)
lint: setup
	$(BIN)/ruff check anomaly pipelines dashboard tests benchmarks setup.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) results data/sample .pytest_cache
