# The commands a newcomer needs; each sets the machine up from nothing first.
VENV ?= .venv
export VENV

.PHONY: setup test demo bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/bin/pytest -q --timeout 900 --benchmark-disable tests benchmarks

demo: setup
	$(VENV)/bin/pyexec demo

bench: setup
	mkdir -p results
	$(VENV)/bin/pytest -q --timeout 1800 benchmarks --benchmark-only --benchmark-json results/bench.json
	$(VENV)/bin/python benchmarks/report.py results/bench.json results

clean:
	rm -rf build *.egg-info pyexec/*.so pyexec/_native.c pyexec/_pxcffi.c pyexec/_core.pxd pyexec/native/_api.py
