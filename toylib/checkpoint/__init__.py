"""Checkpoints: ``tl.save``/``tl.load`` (a directory) and ``tl.save_bytes``/``tl.load_bytes``.

Both store the same thing: every array held by a Variable of ``obj`` (or held
directly as an array attribute), under its model path, once per Variable, and
a digest of it; both check the same things when loading into ``like`` and
give the same errors. See ``entries.py`` for what is stored, ``directory.py``
and ``blob.py`` for the two formats, ``moves.py`` for how a directory is put
in place atomically and safely under concurrent saves.
"""

from toylib.checkpoint.blob import load_bytes, save_bytes
from toylib.checkpoint.directory import load, save

__all__ = ["load", "load_bytes", "save", "save_bytes"]
