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


class KubeConfigMissing(SockopsError):
    """No way to reach a Kubernetes API server: not in a pod, and no usable kubeconfig."""


class NodeNameMissing(SockopsError):
    """The agent does not know its node, so it cannot select the pods it is responsible for."""
