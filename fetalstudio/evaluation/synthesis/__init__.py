"""``python -m fetalstudio eval synthesis``: generated images against real ones.

command (options and the run), data (image sets), features (classifier and Inception features),
metrics (Fréchet distance, MS-SSIM, nearest neighbours), scoring (the report's numbers), plots
(t-SNE, nearest pairs) and report (the report folder). The command's help text is the docstring of
``command``.
"""
