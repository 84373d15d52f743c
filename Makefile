# Everything a fresh clone needs: `make demo`, `make test` (`make test-fast` while working).
# Debian's python3.11 where present: PyTriton's server stub needs the shared libpython of the
# exact interpreter version, which pyenv-style builds do not match (see docs).
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv pins the torch build this machine serves; hub users only need requirements.txt's minimums.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: setup demo test test-fast lint format clean chromium

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PINS) -r requirements.txt -r requirements-dev.txt >$(VENV)/pip.log 2>&1 \
		|| { grep -v "is ignored: it is neither" $(VENV)/pip.log; exit 1; }
	# The project itself, editable (the resnext-hub command; imports resolve to this checkout).
	$(PIP) install --no-deps -e . >>$(VENV)/pip.log 2>&1 || { tail -20 $(VENV)/pip.log; exit 1; }
	$(BIN)/python -c "import torch, torchvision, timm, onnxruntime, onnxscript, tritonclient.grpc, pytriton, resnext_hub"
	$(BIN)/python -m resnext_hub serve --check || echo "note: $(PYTHON) cannot run the Triton server (serve); everything else works"
	touch $@

demo: setup
	$(BIN)/python -m resnext_hub classify assets/images --model se_resnext101_32x4d --top-k 5

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium for the web demo's browser test (Playwright's own browser download needs the internet).
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# `test`: the whole suite (what CI runs). `test-fast`: the same less the tests marked slow (processes,
# servers, compiles, the browser, seconds-long forward passes: see pyproject.toml's markers).
test-fast: MARKERS := -m "not slow"
OPENVINO_TESTS := tests/models/test_quantize.py tests/models/test_openvino_ir.py tests/resnext_hub/test_export_openvino.py \
	tests/space/test_app_openvino_ir.py tests/models/test_autotune.py tests/resnext_hub/test_explain_doors.py \
	tests/resnext_hub/test_triton_openvino.py
test test-fast: setup chromium
	$(BIN)/ruff check .
	# The int8 and OpenVINO IR tests load OpenVINO, whose thread pool crashed a later fork() (DataLoader workers)
	# in the same process: they run in a pytest process of their own.
	$(BIN)/python -m pytest $(MARKERS) tests $(OPENVINO_TESTS:%=--ignore=%)
	$(BIN)/python -m pytest $(MARKERS) $(OPENVINO_TESTS)

clean:
	rm -rf $(VENV) .pytest_cache
