"""The boundary between the trio loop and blocking work: the fetch worker processes.

Owns the daemon ↔ worker protocol (``protocol``: one typed record per message, the
wire form, the worker's start configuration), the daemon side (``lanes``: single
flight, limits, timeouts, replacement of dead workers, error mapping, thread
limiters for store and cache calls), the worker process (``worker``) and its HTTP
client for presigned URLs (``http``). ``lanes`` and ``worker`` both import
``protocol``; neither imports the other. A worker imports neither trio nor boto3.
May import: ``registry``, ``cache``, ``format``, ``config``, ``errors``, ``malloc``.
"""
