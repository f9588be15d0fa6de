# The README's two commands are `make demo` and `make test`.
.PHONY: setup demo test lint report
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/lavin-fast demo

test: setup
	.venv/bin/python -m pytest -q tests

lint:
	.venv/bin/ruff check lavin_fast tests bench

report: setup
	.venv/bin/lavin-fast kernels --report
