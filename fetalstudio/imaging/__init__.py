"""Images, masks and files that every workflow shares (no workflow imports them sideways).

- ``image_input``: PNG/JPG/BMP/TIFF (8/16-bit, gray/RGB(A)) and DICOM ultrasound (pixel spacing
  from the header, identifying fields never exposed) into one grayscale array, with a pixel limit.
- ``files``: atomic writes (bytes, JSON, PNG), an fsynced append, per-folder locks.
- ``masks``: binary-mask checks, overlays, strokes from a browser editor.
- ``ellipse``: head ellipses (fit, fill an outline, HC, Dice, boxes); ``extract``: the Ellipse
  Extractor (a mask channel to a filled head ellipse, with a fit quality); ``biometry``: HC, BPD, OFD.
- ``mask_datasets``: image+mask pairs as nnU-Net v2 and COCO datasets.

May import only ``fetalstudio.errors`` (and numpy, OpenCV, Pillow, pydicom); no torch.
"""
