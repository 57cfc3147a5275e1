"""The one exception users see: a problem with their input or library, said in one line."""


class CNSError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


class LibraryLockedError(CNSError):
    """Another process is writing the same concept library."""
