# Two entry points for a fresh machine: `make demo` and `make test` (see README).
# Both create .venv on first use; torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml
# so pip takes the builds that lie on this machine's disk instead of downloading one.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fusion predict --samples

test: install
	$(VENV)/bin/python -m pytest
