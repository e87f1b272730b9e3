# The two commands (README): `make demo` runs the main job end to end, `make test` runs the tests.
# Both install what they need first (infra/setup.sh: apt packages and the pinned .venv).
.PHONY: setup demo test lint bench-features proto clean lock

VENV := .venv/bin

setup:
	@bash infra/setup.sh

demo: setup
	$(VENV)/friendrec demo

test: setup
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check . && $(VENV)/ruff format --check .

bench-features: setup
	$(VENV)/friendrec bench features

# Regenerate the retrieval service's stubs after editing the .proto (tests/test_protos.py checks
# that the committed stubs match it).
proto: setup
	$(VENV)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		serving/protos/recommender.proto

clean:
	rm -rf .friendrec .pytest_cache .ruff_cache

lock: setup
	(echo "# Every package of the tested environment (pip freeze), used as constraints by infra/setup.sh."; \
	 $(VENV)/pip freeze --exclude-editable | grep -v '^friendrec') > requirements.lock
