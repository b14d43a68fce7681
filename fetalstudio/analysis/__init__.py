"""Analysis of a user's own images: plane classification, box-prompted segmentation, head biometry.

- ``image_input``: PNG/JPG/BMP/TIFF (8/16-bit, gray/RGB(A), any size) and DICOM ultrasound
  (single/multi-frame, pixel spacing from the header, identifying fields never exposed) into one
  grayscale array in original pixels, plus the downscaled view the models get.
- ``segment``: ``CachedPredictor`` (one image-encoder run per image, an LRU of embeddings by image
  hash, then cheap box/point prompts) and ``auto_box`` (a head box without user input).
- ``classify``: ``EnsembleClassifier``, the mean of several plane classifiers' probabilities.
"""
