"""Bulk commands that move whole versions: ``publish`` (cut, name and upload a
directory), ``pull`` (a version onto local disk, verified) and ``prefetch`` (warm a
host's block cache by ref, or read files through a mount), ``adopt`` (a version whose
files stay in a DVC remote or a Git LFS store, read in place).

Each runs a trio loop beside the fetch workers (``transfer.lanes.run_with``), so its
per-byte work happens in the workers, as a mount's does.
May import: ``transfer``, ``registry``, ``describe``, ``cache``, ``format``, and the
top-level helpers (``config``, ``errors``, ``units``, ``progress``).
"""
