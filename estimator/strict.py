"""The estimator's one strict base for typed records and specs: what a user writes or the estimator saves is
validated, and an unknown field is an error, not ignored (every layer imports it: it sits beside errors.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid")
