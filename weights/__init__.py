"""The shipped weights and default model; installed as the package ``posterfusion._weights`` so a
wheel carries them (see pyproject.toml and :mod:`posterfusion.weights`). The conversion scripts
beside them ship too, as the record of how each file was made."""
