"""Named registries of formatters and templates, filled by built-ins and by entry-point plugins.

Third-party packages add entries in two ways:

* a decorator in code that the user imports: ``@register_formatter("my-format")``;
* an entry point in their distribution's metadata, loaded lazily the first time a name is looked up::

    [project.entry-points."hf_instruct_tune.formatters"]
    my-format = "my_package.formatters:my_format"

Set ``HF_INSTRUCT_TUNE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point discovery.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .errors import InputError, unknown_name

logger = logging.getLogger(__name__)

T = TypeVar("T")

DISABLE_AUTOLOAD_ENV = "HF_INSTRUCT_TUNE_DISABLE_PLUGIN_AUTOLOAD"
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Registry(Generic[T]):
    """A dict of lower-case names to entries, with lazily discovered entry-point plugins."""

    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False
        self._loading = False

    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(f"A {self.kind} name should be lower-case letters, digits, '.', '_' or '-', got {name!r}.")
        if name in self._entries and not overwrite:
            raise ValueError(f"There is already a {self.kind} called '{name}', please choose a unique name.")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self.load_plugins()
        if name not in self._entries:
            raise unknown_name(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def load_plugins(self) -> None:
        """Import the entry points of ``self.entry_point_group`` once; a broken plugin is an error naming it."""
        if self._plugins_loaded or self._loading or os.environ.get(DISABLE_AUTOLOAD_ENV, "").lower() in {"1", "true", "yes"}:
            return
        self._loading = True  # a plugin that looks names up while it is imported must not recurse
        try:
            for entry_point in entry_points(group=self.entry_point_group):
                if entry_point.name in self._entries:
                    continue
                try:
                    loaded = entry_point.load()
                except Exception as error:  # a plugin's own import error, surfaced with its name
                    raise InputError(
                        f"The {self.kind} plugin '{entry_point.name}' ({entry_point.value}) failed to load: {error}"
                    ) from error
                self.register(entry_point.name, self._coerce_plugin(entry_point.name, loaded))
                logger.debug("Loaded %s plugin '%s' from %s", self.kind, entry_point.name, entry_point.value)
            # Only once every plugin loaded: after a broken one, the next lookup reports it again.
            self._plugins_loaded = True
        finally:
            self._loading = False

    def _coerce_plugin(self, name: str, loaded: object) -> T:
        return loaded  # type: ignore[return-value]

    def reset_plugins(self) -> None:
        """Forget that plugins were loaded, so the next lookup discovers entry points again."""
        self._plugins_loaded = False


def decorator_for(registry: Registry[Callable]) -> Callable[[str], Callable[[Callable], Callable]]:
    def register(name: str, *, overwrite: bool = False) -> Callable[[Callable], Callable]:
        def wrap(function: Callable) -> Callable:
            registry.register(name, function, overwrite=overwrite)
            return function

        return wrap

    return register
