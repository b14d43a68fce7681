"""Model manager and loaders: what models exist, how to load them, where they live in memory.

- ``manager``: ``ModelManager`` (lazy loads, memory budget, LRU eviction, OOM retry, pinning);
  ``catalog``/``entries``: the manifest and the discovered files; ``inspect``/``hashing``: what a
  file is; ``hub``: Hugging Face downloads; ``device``: device and dtype choice.
- ``loaders``: one loader per model kind; ``single_file``: SD 1.x single-file checkpoints with the
  bundled configs in ``configs/``; ``segmenter``: the segmenter architecture and its checkpoint
  readers (so loading a segmenter needs nothing above this package).

Layer 7: may import only imaging, data, vocabulary, paths, errors (and libraries); never
segmentation, classification or anything above them.
"""

from fetalstudio.models.entries import HubSource, ModelEntry, ModelFormat, ModelKind
from fetalstudio.models.manager import ModelManager, ModelStatus

__all__ = ["HubSource", "ModelEntry", "ModelFormat", "ModelKind", "ModelManager", "ModelStatus"]
