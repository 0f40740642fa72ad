"""Exception types users can catch. Each message names the offending shape, dtype or value."""


class SLViTInputError(ValueError):
    """An input tensor does not fit the exit's config (rank, channels, spatial size, dtype)."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class BackendNotImplementedError(NotImplementedError):
    """A backend name the library knows but that is not built yet."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's config or tensor shapes do not match the model it is loaded into."""
