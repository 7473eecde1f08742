# The two commands (see README): `make up` runs Bulkhead, `make test` runs every test.
.PHONY: up test setup lint bench

up: setup
	.venv/bin/bulkhead up $(ARGS)

test: setup
	bash infra/test.sh

setup:
	bash infra/setup.sh

lint: setup
	.venv/bin/ruff check bulkhead gateway workers billing vmhost tests bench
	.venv/bin/mypy bulkhead gateway workers billing vmhost

bench: setup
	.venv/bin/python bench/jobs.py
	.venv/bin/python bench/sandbox_start.py
	.venv/bin/python bench/sandbox_api.py --isolation namespace,microvm
