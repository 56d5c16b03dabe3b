# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/sockops demo

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check sockops lab tests bench scripts
	.venv/bin/ruff format --check sockops lab tests bench scripts
