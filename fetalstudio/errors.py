"""User-facing errors: every message says what was wrong and what to do."""


class FetalStudioError(Exception):
    """An error the user can act on. The message is shown as-is in the UI and CLI."""


class ModelNotFoundError(FetalStudioError):
    """A model id or path that the manager does not know."""


class ModelLoadError(FetalStudioError):
    """A checkpoint exists but could not be loaded (corrupt, incompatible, missing files)."""


class OfflineModelError(FetalStudioError):
    """A hub model is needed but the machine is offline (or HF_HUB_OFFLINE is set)."""


class OutOfMemoryError(FetalStudioError):
    """The device ran out of memory even after freeing other models."""


class GenerationCancelled(FetalStudioError):
    """The user pressed Cancel; the images finished before that are kept."""
