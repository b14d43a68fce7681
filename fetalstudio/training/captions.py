"""Captions for training images and the BPE tokenizer trained on the app's prompt vocabulary.

Captions follow the papers (``fetalstudio.vocabulary``): "a photo of fetal <plane>" for the five
standard planes (FU-LoRA) and "An ultrasound image of a fetal head, <trimester> trimester" for
head images (the mask-guided head paper).

Head images without a recorded trimester
----------------------------------------
HC18 ships no gestational age; 61 of its images carry a trimester (the Diffusion-based DA
paper's subsets). Their head circumferences are cleanly separated:

==========  ======  ===============
trimester   images  HC (mm)
==========  ======  ===============
first       20      44.3 - 73.7
second      21      161.7 - 199.3
third       20      272.1 - 335.0
==========  ======  ===============

Any threshold inside the two gaps (73.7-161.7 and 199.3-272.1 mm) classifies all 61 correctly,
so the data alone cannot place them. Inside the gaps we use the clinical boundaries, the HC at
14+0 and 28+0 weeks by Hadlock's HC formula (GA = 8.96 + 0.540 HC + 0.0003 HC^3, HC in cm):
**first < 90 mm <= second < 258 mm <= third**. Of the 805 shared HC18 images this gives
126 first, 561 second and 118 third trimester captions.

es_heads (Spanish FETAL_PLANES_DB brain planes) have neither trimester nor pixel size (so no HC
in mm). FETAL_PLANES_DB comes from routine second- and third-trimester screening and its screens
mostly show a "2. Trim" or "3 Trim" preset; by default such images get the *second* trimester
caption (``unknown_trimester="second"``); "skip" leaves them out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fetalstudio.vocabulary import PLANES, TRIMESTERS, Trimester, head_caption, parse_trimester, plane_caption

#: Head circumference (mm) at 14+0 and 28+0 weeks (Hadlock): the trimester boundaries of the proxy.
FIRST_SECOND_HC_MM = 90.0
SECOND_THIRD_HC_MM = 258.0

UNKNOWN_TRIMESTER_CHOICES = ("first", "second", "third", "skip")
DEFAULT_UNKNOWN_TRIMESTER = "second"

#: Words a user is likely to type in a custom prompt, so that they become whole tokens too.
DOMAIN_PHRASES = (
    "an ultrasound image of a fetal head",
    "a photo of fetal head",
    "ultrasound image of the fetal brain in the trans-thalamic plane",
    "trans-cerebellum trans-ventricular trans-thalamic plane view",
    "fetal abdomen with stomach and umbilical vein",
    "fetal thorax with four-chamber view of the heart",
    "fetal femur bone length",
    "maternal cervix",
    "transverse sagittal coronal axial section",
    "skull midline thalami cerebellum ventricle ventricles cavum septi pellucidi",
    "spine stomach heart liver kidney bladder",
    "normal abnormal anomaly ventriculomegaly hydrocephalus",
    "fetus gestational age weeks",
    "high quality clear standard plane",
    "blurry noisy low quality",
    "and or with the in on at",
)


def trimester_from_hc(hc_mm: float) -> Trimester:
    """The trimester whose HC range (Hadlock, see module docstring) contains ``hc_mm``."""
    if hc_mm < FIRST_SECOND_HC_MM:
        return Trimester.FIRST
    if hc_mm < SECOND_THIRD_HC_MM:
        return Trimester.SECOND
    return Trimester.THIRD


def head_trimester(trimester: str | None, hc_mm: float | None, unknown: str = DEFAULT_UNKNOWN_TRIMESTER) -> tuple[Trimester | None, str]:
    """(trimester, how it was decided) for a head image; (None, "skipped") when unknown is "skip"."""
    if trimester not in (None, ""):
        return parse_trimester(str(trimester)), "trimester"
    if hc_mm is not None:
        return trimester_from_hc(hc_mm), "hc_proxy"
    if unknown == "skip":
        return None, "skipped"
    return parse_trimester(unknown), "default_trimester"


def app_captions() -> list[str]:
    """Every caption the app itself writes: the five planes and the three head trimesters."""
    return [plane_caption(p) for p in PLANES] + [head_caption(t) for t in TRIMESTERS]


def prompt_vocabulary(extra: Iterable[str] = ()) -> list[str]:
    """The tokenizer's training text: app captions, domain phrases and the data's own captions."""
    texts = app_captions() + list(DOMAIN_PHRASES)
    seen = set(texts)
    for text in extra:
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


# --- tokenizer -----------------------------------------------------------------------------

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


def _clip_pipeline(tokenizer) -> None:
    """Normaliser and pre-tokeniser exactly as transformers' CLIPTokenizer sets them."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def train_bpe_merges(texts: list[str], max_vocab_size: int = 2048, repeat_app_captions: int = 20) -> list[tuple[str, str]]:
    """BPE merges learnt by the ``tokenizers`` trainer on ``texts`` (CLIP's pre-tokenisation).

    The app's captions are repeated so that their words are merged first; merging stops when every
    word of the corpus is one token or the vocabulary is full.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if max_vocab_size < 512 + 2:
        raise ValueError("The vocabulary needs at least 514 entries (256 bytes, 256 end-of-word bytes, 2 special).")
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=None))
    _clip_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size - 256 - 2,  # the trainer counts 256 bytes + merges; we add 256 "</w>" bytes + 2 special
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    corpus = list(texts) + app_captions() * repeat_app_captions
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    merges = []
    for merge in data["model"]["merges"]:
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        merges.append(pair)
    return merges


def write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]]) -> Path:
    """vocab.json + merges.txt + configs in the layout of SD's CLIP tokenizer.

    Vocabulary order as OpenAI's: 256 byte symbols, the same with "</w>", one entry per merge,
    then <|startoftext|> and <|endoftext|>. Every byte is a token, so no text is ever <unk>.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP's reversible byte -> character map

    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(vocab)
    kept = []
    for left, right in merges:
        merged = left + right
        if left in known and right in known and merged not in known:
            vocab.append(merged)
            known.add(merged)
            kept.append((left, right))
    vocab += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    config = {
        "add_prefix_space": False,
        "bos_token": special(BOS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": special(EOS),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": special(EOS),
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(EOS),
    }
    specials = {name: special(BOS if name == "bos_token" else EOS) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def train_clip_tokenizer(folder: Path, texts: Iterable[str] = (), max_vocab_size: int = 2048) -> Path:
    """Train and write a CLIP-style BPE tokenizer on ``prompt_vocabulary(texts)``."""
    merges = train_bpe_merges(prompt_vocabulary(texts), max_vocab_size=max_vocab_size)
    return write_clip_tokenizer(folder, merges)


def words_not_whole(tokenizer, texts: Iterable[str]) -> dict[str, list[str]]:
    """Words of ``texts`` that the tokenizer splits into several tokens (empty: all whole)."""
    import re

    split = {}
    for text in texts:
        for word in re.findall(r"[^\W\d_]+", text.lower()):
            tokens = tokenizer.tokenize(word)
            if len(tokens) != 1:
                split[word] = tokens
    return split
