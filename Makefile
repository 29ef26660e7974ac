# Set-up and the two jobs a new user runs: `make search` and `make test`.
# torch is pinned for the venv only (2.13.0: a local CPU build here); autoplan itself accepts newer torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv search estimate test bench-cpu bench-cpu-held-out clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,hf]"
	touch $(STAMP)

venv: $(STAMP)

# The main job: plan the bundled example model on a 64-GPU DGX H100 preset.
search: $(STAMP)
	$(BIN)/autoplan search examples/gpt_small.py --gpus 64 --cluster dgx-h100 --out plan.json --force

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# The committed CPU benchmark reports (about 20 minutes on 2 cores): benchmarks/results/bench_*_cpu*/
bench-cpu: $(STAMP)
	$(BIN)/python -m benchmarks.bench_cpu

# The held-out CPU bench on models big enough that kernels decide a step (about 20 minutes on 2 cores)
bench-cpu-held-out: $(STAMP)
	$(BIN)/python -m benchmarks.bench_cpu_held_out

clean:
	rm -rf $(VENV) build *.egg-info
