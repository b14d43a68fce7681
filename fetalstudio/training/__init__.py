"""Training commands: `python -m fetalstudio train sd|lora|classifier|segmenter`.

Each command module defines ``COMMAND`` (a ``fetalstudio.cli_args.Command``: ``add_arguments(parser)``
and ``run(args) -> int``), listed once in ``fetalstudio.cli.commands``, and builds on
``fetalstudio.training.common`` (accelerate, seeding, loss/time log, resumable checkpoints). Models
come through ``fetalstudio.app_context.build_manager``. Layer 2: imports the workflows and everything
below them, never ``ui``/``cli`` nor its sibling ``evaluation``.
"""
