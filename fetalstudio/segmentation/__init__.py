"""Box-prompted fetal-head segmentation built from segment-anything's classes.

- ``ellipse``: outline rings -> filled head masks, ellipse fitting, head circumference (HC), Dice.
- ``model``: a small segment-anything ``Sam`` (timm ResNet or ViT image encoder), its
  ``.safetensors`` format, and SAM ``.pth`` checkpoints (official vit_b/l/h or any size).
- ``predictor``: ``BoxPromptPredictor``: set an image once, then predict a full-resolution
  mask from a box (and optional points); the same code serves the small model and real SAM.

Importing this package is cheap: torch is imported by ``model``/``predictor`` only.
"""
