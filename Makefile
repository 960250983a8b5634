# The project's single entry point. Both targets bootstrap .venv themselves (scripts/bootstrap.sh).
.PHONY: demo test test-fast lint bootstrap

# Also byte-compiles knetlab itself (about 1 s): where PYTHONDONTWRITEBYTECODE is set, every process of a run (Ray
# workers, trial actors, CLI drivers) would otherwise compile the modules it imports from source, 0.2 s or more each.
bootstrap:
	@bash scripts/bootstrap.sh
	@.venv/bin/python -m compileall -q knetlab >/dev/null

# The embedded default: local Ray, local MLflow store, local checkpoints, synthetic ADE20K-format data.
demo: bootstrap
	.venv/bin/knetlab train experiments/smoke.yaml

# The whole suite, slow end-to-end tests included (what CI runs), on 2 worker processes: the suite is bound by CPU,
# and a third worker only adds contention (on 2 cores, 743 passed: 16 min 54-56 s and 1900-2001 CPU-s with 2
# workers, 18-20 min and 2150-2330 CPU-s with 3; docs/performance.md).
test: bootstrap
	.venv/bin/ruff check .
	.venv/bin/pytest -ra --durations=30 -n 2 --dist loadgroup

# Everything but the slow end-to-end tests.
test-fast: bootstrap
	.venv/bin/pytest -ra -m "not slow"

lint: bootstrap
	.venv/bin/ruff check .
