# The two commands of the README. Each creates .venv when it is absent and installs the package
# (with the extras it needs) whenever setup.py changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo clean

$(VENV)/.installed-test: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,sim]"
	touch $@

$(VENV)/.installed-demo: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[sim]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(VENV)/.installed-demo
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) runs
