# Two commands do all set-up on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv serve test lint typecheck bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q -e "clients/python[bench]"
	touch $@

serve: venv
	$(BIN)/denoised serve

lint: venv typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow pyproject's package-dir mapping, so it checks the folders through links
# laid out as the installed denoised.* packages. The __init__.py makes `denoised` a regular
# package there; without it mypy takes models/zoo/judge/ (weights) for the judge module.
typecheck: venv
	rm -rf build/typecheck
	mkdir -p build/typecheck/denoised
	for p in server models kernels; do ln -s ../../../$$p build/typecheck/denoised/$$p; done
	touch build/typecheck/denoised/__init__.py
	$(BIN)/mypy

test: venv lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
