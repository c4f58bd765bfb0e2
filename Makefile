# clipcomp: `make train` runs the main job on the embedded default (the shapes world), `make test` the tests.
# The first target that needs Python creates .venv and installs the project; nothing else is needed.
VENV    ?= .venv
# CPU_KERNELS=portable: the kernels of configs/portable_cpu.env, whose figures do not depend on the kind of CPU
CPU_KERNELS ?= native
ifeq ($(filter native portable,$(CPU_KERNELS)),)
$(error CPU_KERNELS must be native or portable, not '$(CPU_KERNELS)')
endif
PY      := $(if $(filter portable,$(CPU_KERNELS)),env $(shell grep -E '^[A-Z_][A-Z0-9_]*=' configs/portable_cpu.env) )$(VENV)/bin/python
METHOD  ?= clip
BENCH   ?= syn
ARGS    ?=
RESUME  ?=
RUNS    ?=
DATA_ROOT ?=
comma   := ,
empty   :=
space   := $(empty) $(empty)

.DEFAULT_GOAL := help
SWEEP   ?= configs/sweep/compare.yaml
SEEDS   ?=
DATA    ?=
PERF    ?=
.PHONY: help setup train bench compare sweep perf perf-wheels test clean-venv

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: METHOD=$(METHOD) BENCH=$(BENCH) RUNS='run folders' DATA_ROOT=path ARGS='key=value ...' CPU_KERNELS=native|portable"

$(VENV)/.ok: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.ok ## create .venv and install the project with its dev extra

train: $(VENV)/.ok ## train METHOD (default clip) on the default config; ARGS="optim.lr=1e-3 ..."; RESUME=<run folder> continues a run
	$(PY) -m methods.train $(if $(RESUME),resume=$(RESUME) $(ARGS),method=$(METHOD) $(ARGS))

bench: $(VENV)/.ok ## evaluate the latest finished run of every method (or RUNS="dir dir") on BENCH (default syn), print the table
	$(PY) -m benchmarks.run bench=$(BENCH) $(if $(strip $(RUNS)),runs=[$(subst $(space),$(comma),$(strip $(RUNS)))]) \
		$(if $(DATA_ROOT),bench.data_root=$(DATA_ROOT)) $(ARGS)

compare: $(VENV)/.ok ## train every registered method on one shared config (SEEDS="0 1 2", DATA=...), bench, one table
	$(PY) -m benchmarks.sweep configs/sweep/compare.yaml $(if $(strip $(SEEDS)),seeds=[$(subst $(space),$(comma),$(strip $(SEEDS)))]) \
		$(if $(DATA),data=$(DATA)) $(ARGS)

sweep: $(VENV)/.ok ## run SWEEP=configs/sweep/<name>.yaml (resumable); ARGS="--print-commands" lists cluster jobs
	$(PY) -m benchmarks.sweep $(SWEEP) $(ARGS)

perf: $(VENV)/.ok ## training samples/s beside open_clip's own trainer (PERF=gpu|cpu, default: gpu if CUDA); results/perf-<time>/
	$(PY) -m benchmarks.perf $(if $(PERF),perf=$(PERF)) $(ARGS)

WHEELS  ?= .whl
PYVER   ?= 3.12
perf-wheels: ## wheels (into WHEELS=.whl) of what an offline GPU node with torch and lightning lacks for `make perf`; there: bash benchmarks/perf_node.sh DEST
	rm -rf "$(WHEELS)"  # only this recipe's wheels: a stale one of another version would make the node's install fail
	mkdir -p "$(WHEELS)"
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(PYVER) --implementation cp \
		--platform manylinux2014_x86_64 -d $(WHEELS) open_clip_torch==3.3.0 omegaconf==2.3.0 ftfy wcwidth
	python3 -m pip wheel -q --no-deps -w $(WHEELS) antlr4-python3-runtime==4.9.3  # omegaconf's parser: sdist only

test: $(VENV)/.ok ## run the test suite (what CI runs)
	$(PY) -m pytest -q

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
