"""The S3 side: a bucket (``store``, the one place boto3 is used), the registry's layout
in it (``layout``: keys of chunks, manifests, tags, signatures, leases), ``catalog``
(manifests, signatures and tag resolutions: memory → cache → store, offline fallback,
trust checks), ``lifecycle`` (rm, gc and publish leases) and ``source`` (the one
resolver from what a command names to a catalog and a version).

Blocking code, no trio: callers in a trio loop go through ``transfer.lanes``' threads.
May import: ``cache``, ``format``, ``config``, ``errors``, ``units``.
"""
