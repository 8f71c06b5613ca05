"""Training configuration: the shipped defaults, updated by a YAML file and by command-line
overrides, every value checked before any work starts.

A wrong value used to surface minutes later as a TypeError deep in training (``optim.epochs: 0``),
a KeyError (``loss.pos_weight: half``) or not at all (``val_fraction: 1.7``). Each key's type is
the type of its default in ``configs/default.yaml``, so a key added there is type-checked without
touching this module; :data:`RANGES` and :data:`CHOICES` add what a type cannot say. Errors are
one line naming the file, the key and what it accepts; a misspelt key gets the closest known one.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PosterFusionError
from .model import MODES


@dataclass(frozen=True)
class Range:
    """Bounds of a number (``high`` None: none above); ``open_low``/``open_high`` exclude the bound."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above_low = value > self.low or (value == self.low and not self.open_low)
        below_high = self.high is None or value < self.high or (value == self.high and not self.open_high)
        return above_low and below_high

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


POSITIVE = Range(0, open_low=True)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, open_high=True)

RANGES: dict[str, Range] = {
    "seed": Range(0),
    "val_fraction": Range(0, 1, open_low=True, open_high=True),
    "min_genre_posters": AT_LEAST_ONE,
    "head.cnn_hidden": AT_LEAST_ONE,
    "head.detector_hidden": AT_LEAST_ONE,
    "head.hidden": AT_LEAST_ONE,
    "head.text_hidden": AT_LEAST_ONE,
    "head.dropout": FRACTION,
    "head.input_dropout": FRACTION,
    "loss.max_pos_weight": POSITIVE,
    "optim.epochs": AT_LEAST_ONE,
    "optim.batch_size": AT_LEAST_ONE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": Range(0),
    "optim.patience": AT_LEAST_ONE,
    "optim.ensemble": AT_LEAST_ONE,
    "finetune.epochs": AT_LEAST_ONE,
    "finetune.batch_size": AT_LEAST_ONE,
    "finetune.lr_backbone": POSITIVE,
    "finetune.lr_head": POSITIVE,
    "words.C": POSITIVE,
}
"""Allowed ranges of numeric keys (dotted names); keys not listed are checked by type only."""

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "loss.pos_weight": ("none", "sqrt", "full"),
    "finetune.scope": ("tail", "all"),
}
"""The values a text key may take."""

SCALARS = (str, int, float, bool)


def default_config() -> dict:
    """The shipped defaults (``configs/default.yaml``, installed as package data)."""
    import yaml

    return yaml.safe_load((resources.files("posterfusion._configs") / "default.yaml").read_text(encoding="utf-8"))


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The default config, updated by a YAML file and then by explicit overrides (nested dicts),
    each value checked against its default's type and the tables above."""
    import yaml

    defaults = default_config()
    config = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PosterFusionError(f"{path}: config file not found")
        try:
            update = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise PosterFusionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise PosterFusionError(f"{path}: not a text file") from None
        merge(config, update, defaults, str(path))
    merge(config, overrides or {}, defaults, "overrides")
    return config


def merge(config: dict, update: Any, defaults: dict, where: str, prefix: str = "") -> None:
    """Apply ``update`` to ``config`` in place, checking every key and value against ``defaults``."""
    if not isinstance(update, dict):
        what = f"'{prefix[:-1]}'" if prefix else "a config file"
        raise PosterFusionError(f"{where}: {what} must be a mapping of keys to values, not {_show(update)}")
    for key, value in update.items():
        if key not in defaults:
            raise PosterFusionError(f"{where}: unknown config key '{key}'{_under(prefix)}{_suggestion(key, defaults)}")
        if isinstance(defaults[key], dict):
            merge(config[key], value, defaults[key], where, f"{prefix}{key}.")
        else:
            config[key] = check_value(f"{prefix}{key}", value, defaults[key], where)


def check_value(name: str, value: Any, default: Any, where: str) -> Any:
    """``value`` for the key ``name`` if it has its default's type and fits RANGES/CHOICES; ints
    are accepted for float keys, and so is text like ``1e-4`` (YAML reads that as a string)."""
    def refuse(expected: str) -> PosterFusionError:
        return PosterFusionError(f"{where}: {name} must be {expected}, not {_show(value)}")

    if default is None:  # optional keys: nothing to derive a type from
        if value is not None and not isinstance(value, SCALARS):
            raise refuse("a single value or null")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("a whole number")
    elif isinstance(default, float):
        number = _as_float(value)
        if number is None:
            raise refuse("a number")
        value = number
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise refuse("text")
    elif type(value) is not type(default):
        raise refuse(f"a {type(default).__name__}")
    if name in RANGES and value not in RANGES[name]:
        raise refuse(str(RANGES[name]))
    if name in CHOICES and value not in CHOICES[name]:
        raise refuse(f"one of {', '.join(CHOICES[name])}")
    return value


def _as_float(value: Any) -> float | None:
    """A finite float from a number or numeric text; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _under(prefix: str) -> str:
    return f" under '{prefix[:-1]}'" if prefix else ""


def _suggestion(key: Any, known: dict) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(map(str, known))})"


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)
