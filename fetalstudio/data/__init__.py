"""Reading the label tables of ../shared/data and any dataset laid out like them (``tables``: CSV
rows, label columns, image paths).

Layer 8, beside ``imaging`` (they never import each other): may import only vocabulary, paths and
errors.
"""
