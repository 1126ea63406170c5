"""Artifacts: atomic writes, fsync, sha256 and safe loading (:mod:`.files`), the manifest that says how
each artifact was made (:mod:`.manifest`), and the train set committed as one unit (:mod:`.commit`).

A leaf: it knows nothing of models, formats or stages. ``files`` imports nothing of the others;
``commit`` builds on ``files``; ``manifest`` builds on both (a reader rolls an interrupted commit forward)."""

from .files import atomic_path, atomic_write_json, atomic_write_text, safe_torch_load, sha256_file
from .manifest import MANIFEST_NAME, STATE_DICT_NAME, load_manifest, save_manifest, verified_path

__all__ = [
    "MANIFEST_NAME", "STATE_DICT_NAME", "atomic_path", "atomic_write_json", "atomic_write_text", "load_manifest",
    "safe_torch_load", "save_manifest", "sha256_file", "verified_path",
]
