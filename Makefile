# The two commands of the README: `make run` runs the product, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVSTACK := $(PY) -m controlplane.devstack

.PHONY: run test lint typecheck install lock reset-demo-password clean bench

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

## run: the whole product (embedded PostgreSQL + Redis unless DATABASE_URL / REDIS_URL are set)
run: $(STAMP)
	$(DEVSTACK) run

## test: lint, types, migrations, then pytest (incl. the compose file and deploy checks) against real PostgreSQL and Redis
test: $(STAMP) lint typecheck
	CONTROLPLANE_VAR_DIR="$(CURDIR)/var/test" DJANGO_SECRET_KEY="$${DJANGO_SECRET_KEY:-insecure-key-for-tests-only}" \
	  SECRETS_ENCRYPTION_KEYS="$${SECRETS_ENCRYPTION_KEYS:-Zm9yLXRlc3RzLW9ubHktbm90LWEtc2VjcmV0LWtleSE=}" \
	  $(DEVSTACK) exec -- sh -c '$(PY) manage.py makemigrations --check --dry-run && $(PY) -m pytest $(PYTEST_ARGS)'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	DJANGO_SECRET_KEY=typecheck-only $(VENV)/bin/mypy controlplane tenants ai_agents conversations bench usage

## bench: the chat load benchmark (docs/benchmark.md); BENCH_ARGS="-c 50 -d 20" picks cells
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

lock:
	$(VENV)/bin/pip-compile -q --strip-extras --no-header --allow-unsafe -o requirements.txt requirements.in
	$(VENV)/bin/pip-compile -q --strip-extras --no-header --allow-unsafe -c requirements.txt -o requirements-dev.txt requirements-dev.in

reset-demo-password: $(STAMP)
	$(DEVSTACK) exec -- $(PY) manage.py bootstrap_demo --reset-password

clean:
	rm -rf $(VENV) staticfiles .mypy_cache .ruff_cache
