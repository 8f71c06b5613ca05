"""The default training configuration; installed as the package ``posterfusion._configs`` so a
wheel carries it (see pyproject.toml and :mod:`posterfusion.config`)."""
