"""Training commands: `python -m fetalstudio train sd|lora|classifier|segmenter`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and builds on
``fetalstudio.training.common`` (accelerate, seeding, loss/time log, resumable checkpoints).
"""

COMMANDS = {
    "sd": ("fetalstudio.training.sd", "a compact Stable-Diffusion-architecture pipeline from scratch"),
    "lora": ("fetalstudio.training.lora", "LoRA fine-tuning of an SD-architecture pipeline (peft; kohya + diffusers output)"),
    "classifier": ("fetalstudio.training.classifier", "a timm plane classifier (5 planes)"),
    "segmenter": ("fetalstudio.training.segmenter", "a box-prompted fetal-head segmenter (segment-anything classes)"),
}
