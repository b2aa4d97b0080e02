"""The base of the backbones' architecture configs (the `architecture` entry of config.json)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

_Config = TypeVar("_Config", bound="Architecture")


class Architecture:
    """Mixin for frozen dataclass configs: to and from JSON-able dicts (lists become tuples)."""

    # Declared (never set here) so the type checker knows subclasses are dataclasses.
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
