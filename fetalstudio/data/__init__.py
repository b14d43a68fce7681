"""Reading the label tables of ../shared/data and any dataset laid out like them (``tables``: CSV
rows, label columns, image paths), and writing report folders (``reports``: summary JSON,
per-item CSV, summary.md) for training and evaluation.

Layer 8, beside ``imaging`` (they never import each other): may import only vocabulary, paths and
errors.
"""
