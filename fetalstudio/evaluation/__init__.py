"""Evaluation commands: `python -m fetalstudio eval classifier|segmenter|synthesis` (report folders).

Each command module defines ``COMMAND`` (a ``fetalstudio.cli_args.Command``: ``add_arguments(parser)``
and ``run(args) -> int``), listed once in ``fetalstudio.cli.commands``; ``report`` writes the report
folders and ``synthesis/`` is the synthesis evaluation split by concern. Models come through
``fetalstudio.app_context.build_manager``. Layer 2: imports the workflows and everything below
them, never ``ui``/``cli`` nor its sibling ``training``.
"""
