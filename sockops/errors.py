"""Exceptions with the fix in the message: what a user reads when sockops refuses to run."""


class SockopsError(Exception):
    """Base class; the message says what to do."""


class HeadersMissing(SockopsError):
    pass


class BpffsMissing(SockopsError):
    pass


class CgroupMissing(SockopsError):
    pass


class PermissionMissing(SockopsError):
    pass


class NotLoaded(SockopsError):
    pass


class NetnsNotFound(SockopsError):
    pass


class IncompatiblePins(SockopsError):
    pass
