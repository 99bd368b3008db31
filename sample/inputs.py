"""Input checks of the sampling command and the sample folder's PNGs, run before anything is sampled.

`check_arguments` looks at what needs no model (paths, counts, the label scheme, the --out folder and its
manifest); `check_model_fits` at what needs the loaded model and tokenizer (the codebook against the
vocabulary, a null label for guidance, compilable tables). Each error names the flag and the fix.
`png_is_whole` is the cheap test a resume uses to sample an empty or truncated PNG again, and
`read_sample_png` the decoder of the assembly step, which names the file it cannot read.
The job itself (plan, writer, manifest) is `sample/job.py`; the tokenizer/model loaders are elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import decode_png

from engram_vision.config import ModelConfig
from sample.sampling import SamplingConfig

# A PNG starts with this signature and ends with an empty IEND chunk (length 0, type, CRC).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_REDO = "delete it and rerun the same `python -m sample` command: it samples missing images again"

CLI_TOKENIZER_FIX = ("pass the tokenizer whose codes the model was trained on (the token shards' meta.json names "
                     "it) or the model trained on this tokenizer's codes; a LlamaGen .pt is read with the config "
                     "named by --tokenizer_size / --model_size")


def check_arguments(model: str, tokenizer: str, out: str, num_samples: int, batch_size: int, labels: str,
                    label_schemes: tuple[str, ...]) -> dict[str, Any] | None:
    """Raise a ValueError/FileNotFoundError naming the flag for arguments that cannot work; returns the
    manifest already in `out` (None when there is none)."""
    for flag, value in (("--num_samples", num_samples), ("--batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if labels not in label_schemes:
        raise ValueError(f"--labels must be one of {list(label_schemes)}, got {labels!r}")
    for flag, path, what in (("--model", model, "our exported model folder or a LlamaGen c2i .pt"),
                             ("--tokenizer", tokenizer, "our tokenizer folder, a diffusers VQModel folder or a "
                                                        "LlamaGen VQ .pt")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist: pass {what}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: pass a folder (new or of an earlier run)")
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest} is not valid JSON ({error}): it is not a manifest of `python -m sample`; "
                         f"use an empty --out folder") from error


def check_model_fits(config: ModelConfig, tokenizer: torch.nn.Module, sampling: SamplingConfig, has_null: bool,
                     compile: bool, model: str = "--model", tokenizer_name: str = "--tokenizer",
                     fix: str = CLI_TOKENIZER_FIX) -> None:
    """The loaded model and tokenizer can sample with these settings: the codebook is the vocabulary,
    guidance has a null label to run, and compiled decoding has device-resident tables."""
    check_tokenizer_fits(config, tokenizer, model, tokenizer_name, fix)
    if sampling.uses_cfg and not has_null:
        raise ValueError(f"--sampling.cfg_scale={sampling.cfg_scale} needs the model's null label, but {model} was "
                         f"trained without one (class_dropout_prob = 0): sample with --sampling.cfg_scale 1 or "
                         f"a model trained with class dropout")
    engram = config.engram
    if compile and engram is not None and engram.table_device == "host":
        raise ValueError(f"--compile true: {model} keeps its Engram tables on the host "
                         f"(EngramConfig.table_device='host'), which cannot be compiled; pass --compile false")


def check_tokenizer_fits(config: ModelConfig, tokenizer: torch.nn.Module, model: str = "--model",
                         tokenizer_name: str = "--tokenizer", fix: str = CLI_TOKENIZER_FIX) -> None:
    """Raise a ValueError when `tokenizer` cannot be the one whose codes a model of `config` predicts.

    The tokenizer's codebook must be exactly the model's vocabulary: a model of vocab_size V was trained on
    the codes of a V-entry codebook, and another tokenizer decodes its tokens into other images (a larger
    one without any error). The grid needs no check here: the tokenizers are convolutional and decode the
    model's grid (`config.token_grid`) at grid x downsample factor pixels. `model`, `tokenizer_name` and
    `fix` say in the message what to change (the flags of `python -m sample`, or a training callback's
    YAML key).
    """
    codebook, vocab = int(tokenizer.codebook_size), int(config.vocab_size)
    if codebook != vocab:
        raise ValueError(f"{tokenizer_name} has a codebook of {codebook} codes but {model} predicts "
                         f"vocab_size={vocab} tokens: {fix}")


def png_is_whole(path: Path) -> bool:
    """Whether `path` is a file that starts like a PNG and ends with its IEND chunk (reads 20 bytes): an
    empty or cut file is not, and a resume samples it again. Damage inside is left to `read_sample_png`."""
    try:
        size = path.stat().st_size
        if size < len(_PNG_SIGNATURE) + len(_PNG_END):
            return False
        with open(path, "rb") as handle:
            head = handle.read(len(_PNG_SIGNATURE))
            handle.seek(size - len(_PNG_END))
            return head == _PNG_SIGNATURE and handle.read() == _PNG_END
    except OSError:
        return False


def read_sample_png(path: Path) -> np.ndarray:
    """uint8 [H,W,3] of one sample PNG; a ValueError naming the file and the fix when it cannot be read."""
    if not path.is_file():
        raise ValueError(f"sample image {path} is missing: rerun the same `python -m sample` command")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"sample image {path} is empty (0 bytes): {_REDO}")
    try:
        image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as error:
        raise ValueError(f"sample image {path} is not a readable PNG ({error}): {_REDO}") from error
    return image.permute(1, 2, 0).numpy()


def read_sample_pngs(paths: list[Path]) -> np.ndarray:
    """uint8 [N,H,W,3] of the sample PNGs; every unreadable one is named in one error (up to 10)."""
    pixels, bad = [], []
    for path in paths:
        try:
            pixels.append(read_sample_png(path))
        except ValueError:
            bad.append(str(path))
    if bad:
        listed = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{len(bad)} sample image(s) cannot be read: {listed}; delete them and rerun the same "
                         f"`python -m sample` command: it samples missing images again")
    shapes = {image.shape for image in pixels}
    if len(shapes) > 1:
        raise ValueError(f"the sample images differ in size {sorted(shapes)[:3]}: the folder mixes two runs; "
                         f"use an empty --out folder")
    return np.stack(pixels)
