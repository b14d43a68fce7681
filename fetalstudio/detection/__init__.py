"""Structure detection: boxes of anatomical structures (e.g. the 9 of the facial sagittal plane)
on a grayscale scan.

- ``predict``: ``StructureDetector.detect(image) -> [Detection]`` in the image's own pixels, from a
  model the manager loaded (architecture and checkpoint format in ``fetalstudio.models.detector``);
- ``letterbox``: the square input and back (shared by training and prediction);
- ``targets``: heatmap/size/offset training targets and the loss;
- ``metrics``: AP50 and mean IoU per structure (numpy), for training and ``eval flex``.

Layer 6, beside classification and segmentation (never imports them): may import models,
imaging, data, vocabulary, paths and errors.
"""
