"""``python -m fetalstudio flex presets``: the anomaly presets (built-in and the user's), with their
plane and clinical meaning. User presets are the ``*.json`` files in ``$FETALSTUDIO_PRESETS`` (default
``outputs/presets/``); a broken one is reported on stderr and the others are still listed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fetalstudio.cli_args import Command


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (name, title, plane, meaning, marker, parameters, edits, source)")
    parser.add_argument("--folder", type=Path, help="folder of user presets to scan instead of $FETALSTUDIO_PRESETS or outputs/presets")


def run_presets(args: argparse.Namespace) -> int:
    from fetalstudio.anatomy.presets import load_presets

    catalog = load_presets(args.folder)
    for problem in catalog.problems:
        print(f"warning: preset skipped: {problem}", file=sys.stderr)
    presets = list(catalog.presets.values())
    if args.json:
        print(json.dumps([{**preset.to_dict(), "source": preset.source} for preset in presets], indent=2))
        return 0
    width = max(len(preset.name) for preset in presets)
    plane_width = max(len(preset.plane) for preset in presets)
    for preset in presets:
        parameters = ", ".join(f"{k}={p.default}" for k, p in preset.parameters.items())
        origin = "" if preset.source == "built-in" else f" [{preset.source}]"
        print(f"{preset.name:<{width}}  {preset.plane:<{plane_width}}  {preset.clinical_meaning}"
              + (f" (parameters: {parameters})" if parameters else "") + origin)
    return 0


PRESETS = Command("presets", "list the anomaly presets (built-in and user): name, plane, clinical meaning",
                  add_presets_arguments, run_presets, description=__doc__)
