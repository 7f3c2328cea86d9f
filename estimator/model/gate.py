"""What a saved estimator may answer: each config checked once against the training data (memoised), lengths
against the trained range, and the refusal (or, with `allow_unseen`, the flag) for what was never trained.

`ConfigGate.checked(config)` answers a `Checked`: the config completed with its non-feature columns, its row in
the compiled tables (None: the booster answers), what in it was never trained, and `fast`: the tables answer it
with nothing to say (a trained config in the tables, no text features), the scheduler's path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from estimator.errors import EstimatorError
from estimator.model.features import config_key, key_part
from estimator.model.meta import ModelMeta, axis_ranges, number
from estimator.model.tables import CompiledTables

LENGTH_KEYS = frozenset({"text_tokens", "position", "text"})  # row keys that are not config columns
EXTRAPOLATING_VARIANTS = frozenset({"residual"})  # shaped by the closed form beyond the trained lengths


@dataclass
class Checked:
    """A config as checked once: completed, its table row (None: the booster's path), what was never trained
    (`unseen`, and the refusal's text in `error`), and whether the tables answer it with nothing to say."""

    config: dict[str, Any]
    table: int | None
    unseen: tuple[str, ...]
    error: str | None
    fast: bool


class ConfigGate:
    """Checks configs and lengths against one model's training data (see the module docstring)."""

    def __init__(self, meta: ModelMeta, tables: CompiledTables | None, text_features: bool) -> None:
        self.meta, self.tables, self.text_features = meta, tables, text_features
        self.ranges = meta.axis_ranges or axis_ranges(meta.training.configs, meta.config_columns)
        t = meta.training
        self.t_range = (t.text_tokens_min, t.text_tokens_max)
        self.p_max = t.position_max
        self.steps_max = t.decode_steps_max
        self.extrapolates = meta.variant in EXTRAPOLATING_VARIANTS
        self._trained_keys = {config_key(c, meta.config_columns) for c in t.configs}
        self._memo: dict[Any, Checked] = {}
        self._warned: set[str] = set()

    def complete(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` with missing non-feature config columns (e.g. `model`) filled from the one trained config
        that matches; missing feature axes stay missing (an error when predicting)."""
        out = dict(config)
        missing = [c for c in self.meta.config_columns if c not in out and c not in self.meta.axes]
        if not missing:
            return out
        given = [c for c in self.meta.config_columns if c in out]
        key = config_key(out, given)
        matches = [c for c in self.meta.training.configs if config_key(c, given) == key]
        values = {m: {str(c.get(m)) for c in matches} for m in missing}
        for m in missing:
            if len(values[m]) == 1:
                out[m] = next(c[m] for c in matches)
        return out

    def checked(self, config: Mapping[str, Any]) -> Checked:
        """The checked config (memoised: each distinct config is checked once)."""
        try:
            token: Any = frozenset(config.items())
        except TypeError:
            return self._check(config)
        found = self._memo.get(token)
        if found is None:
            found = self._memo[token] = self._check(config)
        return found

    def _check(self, config: Mapping[str, Any]) -> Checked:
        full = self.complete(config)
        unknown = sorted(set(full) - set(self.meta.config_columns) - LENGTH_KEYS)
        if unknown:
            axes = ", ".join(self.meta.config_columns)
            raise EstimatorError(f"unknown axis {', '.join(unknown)} (model axes: {axes})")
        missing = [a for a in self.meta.axes if a not in full]
        if missing:
            raise EstimatorError(f"config lacks axis value(s) for {', '.join(missing)}")
        unseen: list[str] = []
        messages: list[str] = []
        for col in self.meta.config_columns:
            rng = self.ranges.get(col)
            if col not in full or rng is None:
                continue
            v = full[col]
            if rng.kind == "numeric":
                x = number(v)
                if x is None or not (rng.min is not None and rng.max is not None and rng.min <= x <= rng.max):
                    unseen.append(f"{col}={v}")
                    messages.append(f"{col}={v} is outside the trained range {rng.span()}")
            elif key_part(v) not in rng.values:
                unseen.append(f"{col}={v}")
                messages.append(f"{col}={v} was never trained (trained values: {', '.join(rng.values)})")
        cols = [c for c in self.meta.config_columns if c in full]
        categorical = all(r.kind == "categorical" for c, r in self.ranges.items() if c in cols)
        if not unseen and categorical and config_key(full, cols) not in self._trained_keys_for(cols):
            shown = {c: full[c] for c in cols}
            unseen.append(f"config {shown}")
            messages.append(f"config {shown} was never trained (each value was, not together)")
        table = None
        if self.tables is not None:
            table = self.tables.index.get(config_key(full, self.meta.axes))
        error = None
        if messages:
            error = "; ".join(messages) + " (pass allow_unseen=True / --allow-unseen for a best guess)"
        fast = table is not None and not unseen and not self.text_features
        return Checked(full, table, tuple(unseen), error, fast)

    def _trained_keys_for(self, cols: Sequence[str]) -> set[tuple[str, ...]]:
        if list(cols) == list(self.meta.config_columns):
            return self._trained_keys
        return {config_key(c, cols) for c in self.meta.training.configs}

    def in_range(self, text_tokens: int, last_position: int | None) -> bool:
        """The lengths lie inside the trained range (nothing to refuse, flag or note)."""
        lo, hi = self.t_range
        return lo <= text_tokens <= hi and (last_position is None or last_position <= self.p_max)

    def lengths(self, text_tokens: int, last_position: int | None) -> tuple[list[str], list[str]]:
        """(unseen, notes) for lengths outside the trained range; extrapolating variants answer with a note."""
        out: list[str] = []
        lo, hi = self.t_range
        if not lo <= text_tokens <= hi:
            out.append(f"text_tokens={text_tokens} (trained {lo}..{hi})")
        if last_position is not None and last_position > self.p_max:
            out.append(f"decode position {last_position} (trained up to {self.p_max})")
        if out and self.extrapolates:
            return [], [f"{o}: extrapolated by the {self.meta.variant} variant's closed form" for o in out]
        return out, []

    def admit(self, cfg: Checked, unseen_lengths: list[str], allow_unseen: bool) -> tuple[str, ...]:
        """What was never trained in this question; EstimatorError naming it unless `allow_unseen`."""
        unseen = cfg.unseen + tuple(unseen_lengths)
        if unseen and not allow_unseen:
            parts = [cfg.error.rsplit(" (pass", 1)[0]] if cfg.error else []
            parts += [
                f"{u} is outside the training data and the {self.meta.variant} variant cannot extrapolate"
                for u in unseen_lengths
            ]
            raise EstimatorError("; ".join(parts) + " (pass allow_unseen=True / --allow-unseen for a best guess)")
        if cfg.table is None and self.tables is not None:
            self.warn_once(f"config {cfg.config} is not in the compiled tables: answered by the LightGBM booster")
        return unseen

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)
