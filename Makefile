# Two commands set everything up on a fresh machine: `make test` and `make demo` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# .venv holds CPU jax plus libtpu and the CUDA plugin (ahead-of-time TPU and H100 compiles, no CUDA libraries);
# on a TPU VM run with JAX_PLATFORMS=tpu.
export JAX_PLATFORMS ?= cpu

.PHONY: test demo install clean-venv

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[data,convert,test,tpu,gpu-aot]'
	# Reference modules for VQ-GAN parity; its declared dependencies would replace the pinned torch.
	$(PY) -m pip install -q --no-deps taming-transformers==0.0.1
	touch $(STAMP)

# --durations: the slowest tests, so a CI log shows where the suite's time goes.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# XLA:CPU's YNNPACK fusions ran the demo's VQ-GAN convolutions ~30% slower than its default kernels (NOTES.md).
demo: $(STAMP)
	XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type= $${XLA_FLAGS:-}" $(PY) -m llmcxr_jax.demo --out demo_out

clean-venv:
	rm -rf $(VENV)
