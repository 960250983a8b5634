# The project's single entry point. Both targets bootstrap .venv themselves (scripts/bootstrap.sh).
.PHONY: demo test test-fast lint bootstrap

bootstrap:
	@bash scripts/bootstrap.sh

# The embedded default: local Ray, local MLflow store, local checkpoints, synthetic ADE20K-format data.
demo: bootstrap
	.venv/bin/knetlab train experiments/smoke.yaml

# The whole suite, slow end-to-end tests included (what CI runs), on 3 worker processes: most of a Ray end-to-end
# test is waiting (process start-up, health checks, uploads), so three of them share 2 cores well.
test: bootstrap
	.venv/bin/ruff check .
	.venv/bin/pytest -ra --durations=30 -n 3 --dist loadgroup

# Everything but the slow end-to-end tests.
test-fast: bootstrap
	.venv/bin/pytest -ra -m "not slow"

lint: bootstrap
	.venv/bin/ruff check .
