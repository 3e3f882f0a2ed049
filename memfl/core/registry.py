"""Methods register themselves here: their strategy, their config section, their engines.

``core`` imports no method. A method package (``memfl/methods/<name>/__init__.py``) calls
:func:`register_method` (and :func:`memfl.core.engine.register_engine` for a new plan kind) when it
is imported; ``memfl.methods`` imports every shipped method, and ``import memfl`` imports
``memfl.methods``. A method of your own registers the same way, before the config is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memfl.core.config import Section
    from memfl.core.strategy import Strategy

#: method name (``run.method``) -> strategy class
STRATEGIES: dict[str, type["Strategy"]] = {}
#: method name -> the name of the config section its strategy reads (``ctx.settings``), if any
METHOD_SECTIONS: dict[str, str | None] = {}
#: config section name (``[scalefl]``) -> its pydantic model
CONFIG_SECTIONS: dict[str, type["Section"]] = {}


def register_method(name: str, strategy: type["Strategy"], section: tuple[str, type["Section"]] | None = None) -> None:
    """Make ``run.method = name`` train with ``strategy``.

    section: ``(table name, pydantic model)`` of the settings the strategy reads; the config gains
             that table (several methods may share one: ``random`` and ``oort`` read
             ``[fedhybrid]``), and the strategy receives it, typed, as ``ctx.settings``.
    """
    if name in STRATEGIES and STRATEGIES[name] is not strategy:
        raise ValueError(f"method {name!r} is already registered ({STRATEGIES[name].__module__})")
    STRATEGIES[name] = strategy
    METHOD_SECTIONS[name] = None
    if section is not None:
        table, model = section
        if CONFIG_SECTIONS.get(table, model) is not model:
            raise ValueError(f"config section [{table}] is already registered by another model")
        CONFIG_SECTIONS[table] = model
        METHOD_SECTIONS[name] = table
