"""Generation parameters inside PNGs: an A1111-style ``parameters`` text chunk (read by other SD
tools) and a ``fetalstudio`` JSON chunk with everything needed to reproduce the image exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from fetalstudio.errors import FetalStudioError
from fetalstudio.pipelines.samplers import parse_sampler
from fetalstudio.pipelines.settings import TEXT_TO_IMAGE, GenerationSettings, LoraSpec, Reproduction

PARAMETERS_KEY = "parameters"
JSON_KEY = "fetalstudio"
_LORA_TAG = re.compile(r"<lora:([^:>]+):([0-9.]+)>")


def a1111_parameters(settings: GenerationSettings, seed: int, metadata: dict) -> str:
    """The text A1111 writes: prompt (with <lora:name:weight> tags), negative prompt, key: value line."""
    lora_tags = "".join(f" <lora:{l['name']}:{l['weight']:g}>" for l in metadata.get("loras", []))
    fields = {
        "Steps": settings.steps,
        "Sampler": parse_sampler(settings.sampler).label,
        "CFG scale": f"{settings.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": metadata.get("model", {}).get("hash", ""),
        "Model": metadata.get("model", {}).get("name", settings.model),
    }
    if metadata.get("loras"):
        fields["Lora hashes"] = '"' + ", ".join(f"{l['name']}: {l['hash']}" for l in metadata["loras"]) + '"'
    fields["Version"] = f"FetalStudio {metadata.get('versions', {}).get('fetalstudio', '')}".strip()
    lines = [settings.prompt + lora_tags]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def png_info(settings: GenerationSettings, seed: int, metadata: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(settings, seed, metadata))
    info.add_text(JSON_KEY, json.dumps(metadata, sort_keys=True))
    return info


def save_png(image: Image.Image, path: Path, settings: GenerationSettings, seed: int, metadata: dict) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written PNG behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.part")
    image.save(temporary, format="PNG", pnginfo=png_info(settings, seed, metadata))
    temporary.replace(path)
    return path


def read_png_text(path_or_image: Path | str | Image.Image) -> dict[str, str]:
    try:
        image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    except (OSError, ValueError) as error:
        raise FetalStudioError(f"Cannot read {path_or_image} as an image ({error}). Pick a PNG made by FetalStudio or A1111.") from error
    return {k: v for k, v in (getattr(image, "text", None) or image.info).items() if isinstance(v, str)}


def settings_from_png(path_or_image: Path | str | Image.Image) -> GenerationSettings:
    """The image's own settings (its seed, batch of one): from our JSON chunk, else from A1111 parameters.

    Generated alone, these give the image up to the last bits of batched arithmetic; for the exact
    pixels of an image made in a batch use ``reproduction_from_png``.
    """
    text = read_png_text(path_or_image)
    if JSON_KEY in text:
        data = _fetalstudio_chunk(text[JSON_KEY])
        return GenerationSettings.from_dict({**data["settings"], "seed": data["seed"], "batch_size": 1, "batch_count": 1})
    if PARAMETERS_KEY in text:
        return parse_a1111_parameters(text[PARAMETERS_KEY])
    raise _no_parameters_error()


def reproduction_from_png(path_or_image: Path | str | Image.Image) -> Reproduction:
    """How to remake the image exactly: the batch it was made in (size and seeds) and its position.

    PNGs from before the batch was recorded, and A1111 PNGs, give the image's own seed alone.
    """
    text = read_png_text(path_or_image)
    if JSON_KEY not in text:
        return Reproduction(settings_from_png(path_or_image), 0)
    data = _fetalstudio_chunk(text[JSON_KEY])
    batch = data.get("batch") or {"size": 1, "index": 0, "seeds": [data["seed"]]}
    settings = GenerationSettings.from_dict(
        {**data["settings"], "seed": batch["seeds"][0], "batch_size": batch["size"], "batch_count": 1}
    )
    return Reproduction(settings, int(batch["index"]), data["task"])


def _fetalstudio_chunk(text: str) -> dict:
    try:
        data = json.loads(text)
        data["settings"] = dict(data["settings"])
        data["seed"] = int(data["seed"])
        # PNGs written before the task was recorded were all text-to-image
        data["task"] = dict(data.get("task") or {"name": TEXT_TO_IMAGE})
        data["task"]["name"] = str(data["task"]["name"])
    except (ValueError, KeyError, TypeError) as error:
        raise FetalStudioError(
            f"The PNG's fetalstudio metadata is damaged ({type(error).__name__}: {error}); pick the original file."
        ) from error
    # PNGs written before the output colour was recorded kept the decoder's RGB pixels
    data["settings"].setdefault("color", "rgb")
    return data


def _no_parameters_error() -> FetalStudioError:
    return FetalStudioError(
        "This PNG carries no generation parameters (no 'parameters' or 'fetalstudio' text chunk). "
        "Images re-saved by other programs often lose them; pick the original file."
    )


def parse_a1111_parameters(text: str) -> GenerationSettings:
    lines = text.strip().split("\n")
    fields_line = lines[-1]
    prompt_lines, negative = [], ""
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            negative = line.removeprefix("Negative prompt:").strip()
        elif negative:
            negative += "\n" + line
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines)
    loras = tuple(LoraSpec(name, float(weight)) for name, weight in _LORA_TAG.findall(prompt))
    prompt = _LORA_TAG.sub("", prompt).strip()
    fields = dict(re.findall(r'\s*([\w ]+):\s*("[^"]*"|[^,]*)', fields_line))
    try:
        width, height = (int(v) for v in fields.get("Size", "512x512").split("x"))
        sampler = fields.get("Sampler", "Euler").strip()
        try:
            sampler = parse_sampler(sampler).key
        except ValueError:
            pass  # kept as written; validation explains it when the user generates
        return GenerationSettings(
            model=fields.get("Model", "").strip(),
            prompt=prompt,
            negative_prompt=negative,
            sampler=sampler,
            steps=int(fields.get("Steps", 20)),
            guidance_scale=float(fields.get("CFG scale", 7.5)),
            width=width,
            height=height,
            seed=int(fields.get("Seed", -1)),
            loras=loras,
        )
    except ValueError as error:
        raise FetalStudioError(f"The PNG's parameters could not be read ({error}): {fields_line[:200]}") from error
