"""The base of every typed config section, and the error a wrong setting raises.

Sections are pydantic models with ``extra="forbid"`` and strict types, so a misspelt key or a
wrong type is refused; :mod:`memfl.config` turns pydantic's errors into one message naming the key.
A method's section lives in its package (``memfl/methods/scalefl/config.py``) and is the one source
of that method's defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the key and the fix."""


class Section(BaseModel):
    """A ``[table]`` of the config: unknown keys and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
