"""Rebuild the CLIP BPE tokenizer files of ``configs/sd15/tokenizer`` from OpenAI's BPE list.

The Stable Diffusion 1.x text encoder uses OpenAI's CLIP ViT-L/14 tokenizer. Its byte-level BPE
vocabulary ships (MIT licence) as ``bpe_simple_vocab_16e6.txt.gz`` inside OpenAI's ``CLIP``
repository and inside the ``open_clip_torch`` wheel on PyPI. This script turns that file into the
``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, building the
vocabulary exactly the way OpenAI's ``SimpleTokenizer`` does:

* merges = lines ``[1 : 49152 - 256 - 2 + 1]`` of the file (48 894 merges; line 0 is a header);
* vocab  = the 256 ``bytes_to_unicode`` characters (in order), the same 256 each followed by
  ``</w>``, ``"".join(merge)`` for every merge, then ``<|startoftext|>`` and ``<|endoftext|>``
  (49 408 entries, so ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407).

Usage (nothing here touches the network; fetch the .gz however you like, for example)::

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python fetalstudio/models/configs/build_clip_tokenizer.py /tmp/oc/bpe_simple_vocab_16e6.txt.gz

The output folder defaults to ``configs/sd15/tokenizer`` next to this script. Output is
deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # = 48894, as in OpenAI's SimpleTokenizer
VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

DEFAULT_OUT = Path(__file__).resolve().parent / "sd15" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2 reversible byte -> printable unicode character table (insertion order matters)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not look like OpenAI's bpe_simple_vocab_16e6.txt.gz")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"built a vocabulary of {len(vocab)} ({len(set(vocab))} unique), expected {VOCAB_SIZE}")
    return vocab


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(bpe_gz: Path, out_dir: Path = DEFAULT_OUT) -> None:
    merges = read_merges(Path(bpe_gz))
    vocab = build_vocab(merges)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    # Same settings as the tokenizer of openai/clip-vit-large-patch14 used by SD 1.x (pad = unk = EOS).
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _added_token(EOS),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": _added_token(EOS),
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS),
    }
    special_tokens_map = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": _added_token(EOS),
        "unk_token": _added_token(EOS),
    }
    for name, data in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens_map)):
        (out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    write_tokenizer(args.bpe_gz, args.out)
    print(f"wrote CLIP tokenizer ({VOCAB_SIZE} tokens) to {args.out}")


if __name__ == "__main__":
    main()
