"""The Synthesis workflow (the Synthesis tab and the ``synthesize`` CLI): dataset export
(``dataset.py``: images per plane x sampler with metadata.csv, resumable) and the gallery of
interactively generated images (``gallery.py``). Prompts come from ``fetalstudio.vocabulary``.

Generation itself (settings, samplers, the prepared pipeline and its runners, PNG metadata) lives in
``fetalstudio.pipelines``. May import: pipelines, models, imaging, data, vocabulary, errors, paths.
"""
