"""CLIP's BPE tokenizer rebuilt offline from the vocabulary file that open-clip-torch ships.

The rebuilt vocabulary follows CLIP's own `simple_tokenizer.py`: 256 byte symbols, the same with
`</w>`, the 48,894 merges joined, then `<|startoftext|>` and `<|endoftext|>` (49,408 entries), so the
ids equal those of the tokenizer shipped with every Stable Diffusion checkpoint.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from kiln.errors import ModelError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
N_MERGES = 49152 - 256 - 2  # the count CLIP uses; the file holds more lines than that


def find_bpe_file() -> Path:
    """Locate CLIP's BPE file inside open-clip-torch or clip-anytorch without importing them
    (both import torchvision, which does not load beside the CPU torch)."""
    for module in ("open_clip", "clip"):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise ModelError(
        f"CLIP's vocabulary file {BPE_FILE_NAME} was not found",
        hint="pip install --no-deps open-clip-torch==3.3.0   (make setup does this)",
    )


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_vocabulary(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merge lines) exactly as CLIP builds them."""
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, [" ".join(m) for m in merges]


def write_clip_tokenizer(out_dir: Path, pad_token: str = EOS) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs).

    SD 1.x pads with `<|endoftext|>`; SD 2.x pads with `!` (id 0).
    """
    vocab, merges = build_vocabulary(find_bpe_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
