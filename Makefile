# The README's two commands are `make demo` and `make test`.
.PHONY: setup demo test lint report bench-cpu bench-compare ci
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/lavin-fast demo

# regenerate the demo's bundled tiny ST-VAE, fitted offline (1 thread: the figures depend on the thread count;
# about 20 minutes on an idle core)
.PHONY: demo-vae
demo-vae: setup
	.venv/bin/lavin-fast demo --fit-vae-only lavin_fast/data/demo_tiny_vae.safetensors --threads 1

# A CUDA device (torch sees one) runs the GPU tests with compiled kernels; without one, Triton's interpreter.
# Set LAVIN_FAST_GPU_TESTS=0 or 1 to choose by hand.
test: setup
	@gpu=$${LAVIN_FAST_GPU_TESTS:-$$(.venv/bin/python -c "import torch; print(int(torch.cuda.is_available()))")}; \
	echo "make test: LAVIN_FAST_GPU_TESTS=$$gpu"; \
	LAVIN_FAST_GPU_TESTS=$$gpu .venv/bin/python -m pytest -q tests

lint:
	.venv/bin/ruff check lavin_fast tests bench

report: setup
	.venv/bin/lavin-fast kernels --report

# CPU benchmarks: the J-DiT / ST-VAE side-by-side rows (bench/cpu_dit.py; PUBLISHED=DIR, a checkout of
# DerrickWang005/LaVin-DiT, adds the published code's rows), the C++ CPU kernels op by op against the torch forms
# (bench/cpu_fused.py), then pytest-benchmark, each run saved under bench/results/cpu/ (compare with bench-compare).
bench-cpu: setup
	.venv/bin/python -m bench.cpu_dit $(if $(PUBLISHED),--published $(PUBLISHED))
	.venv/bin/python -m bench.cpu_fused
	.venv/bin/python -m pytest bench/test_cpu_benchmarks.py -p no:cacheprovider --benchmark-only \
		--benchmark-storage=bench/results/cpu --benchmark-autosave --benchmark-columns=min,median,mean,stddev,rounds

# The last two saved runs side by side (pytest-benchmark compare).
bench-compare:
	.venv/bin/pytest-benchmark --storage bench/results/cpu compare --columns=min,median,mean --group-by=name \
		$$(ls bench/results/cpu/*/*.json | tail -2)

# What CI runs on a clean clone: sdist -> wheel, a fresh core venv (CPU torch first), the CLI from outside the
# checkout, [demo] alone, then `make test`.
ci:
	bash .ci/run
