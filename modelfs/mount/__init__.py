"""The mount: a read-only FUSE filesystem of a model version, a registry or a checkout.

Owns the daemon's life (``daemon``), what it shows, resolved (``resolving``: by the
daemon, or by a helper forked beside its start) and its settings as each of its processes
needs them (``settings``), the FUSE operations (``fs``, the one user of
pyfuse3, thin over the next two), the namespace (``namespace``: names, inodes, TTL'd
listings), where a reader's bytes come from (``reader``), readahead (``readahead``:
policy, knobs and execution), the mount point as the OS sees it (``mountpoint``),
live figures (``metrics``), the names of its extended attributes (``xattrs``, which
commands import without FUSE) and the mount(8) helper (``fstab``).
May import: ``transfer``, ``registry``, ``describe``, ``cache``, ``format``, and the
top-level helpers (``config``, ``errors``, ``units``, ``logs``, ``malloc``).
"""
