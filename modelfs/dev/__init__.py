"""Development tools, not the product: a local SeaweedFS S3 server on free loopback
ports (``devserver``, started and stopped by PID), a local cache tier node (``tiernode``:
nginx from ``modelfs tier-config``), sample safetensors models (``sample``) and the
quick-start demo (``demo``: ``python -m modelfs.dev.demo``).
Tests and benchmarks use them. May import anything; nothing in the product imports them.
"""
