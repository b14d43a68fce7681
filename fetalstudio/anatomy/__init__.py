"""Anatomy engine (FetalFlex, ../shared/docs/METHODS.md section 3): layouts of structure boxes, their
maps, edits with undo/redo, ROI masks and anomaly presets. A workflow: it imports the shared layers
(vocabulary, imaging, errors), never the pipelines' siblings; the pipelines take its maps and masks
as plain arrays."""
