"""The ``modelfs`` command line: parse, build config, call one module, print.

Owns: argument parsing, the one-line error contract, progress and summaries. It may
import every other part of modelfs (it is the top of the one-way graph); nothing
imports it. Commands resolve their arguments into a :class:`~modelfs.config.StoreConfig`
and refs, then hand off; no storage logic lives here. The commands are grouped by
what they act on: :mod:`.versions` (writing a registry), :mod:`.reading` (reading
versions), :mod:`.host` (mounts and this host's cache); :mod:`.app` is the group.
"""

from . import host, reading, versions  # noqa: F401  (each registers its commands on main)
from .app import main

__all__ = ["main"]
