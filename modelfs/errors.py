"""One exception hierarchy for everything a user can cause or meet.

The CLI turns any :class:`ModelfsError` into one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback (with ``--debug`` always).
"""


class ModelfsError(Exception):
    """Base class: the message is meant for the user, on one line."""

    exit_code = 1


class UsageError(ModelfsError):
    """A malformed reference, option or argument."""

    exit_code = 2


class ManifestError(ModelfsError):
    """A manifest that is malformed, hostile or of an unknown format."""


class NotFoundError(ModelfsError):
    """A model, tag, version or object that does not exist."""


class StoreError(ModelfsError):
    """The object store failed: unreachable, denied, missing bucket, 5xx after retries."""


class AccessDeniedError(StoreError):
    """The store refused this host's credentials for an object or bucket (403)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached, timed out, or failed on its side (5xx): maybe passing."""


class IntegrityError(ModelfsError):
    """Bytes whose hash does not match what the manifest promises."""


class TrustError(ModelfsError):
    """A signature that is missing, malformed, from an untrusted key, or does not match."""
