# Two targets do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default dataset (scikit-learn digits): a simulated run, unattended.
run: $(STAMP)
	$(PY) app.py --oracle simulated --dataset digits --strategy entropy --initial 100 --query-size 100 --rounds 10 --seed 0 --out runs/digits-entropy

# The annotator in the browser (human oracle) on the default dataset.
serve: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
