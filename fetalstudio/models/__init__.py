"""Model manager and loaders: what models exist, how to load them, where they live in memory."""

from fetalstudio.models.entries import HubSource, ModelEntry, ModelFormat, ModelKind
from fetalstudio.models.manager import ModelManager, ModelStatus

__all__ = ["HubSource", "ModelEntry", "ModelFormat", "ModelKind", "ModelManager", "ModelStatus"]
