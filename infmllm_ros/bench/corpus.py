"""The benchmark corpus: the King James Bible (Debian `bible-kjv-text`), byte tokens, a fixed train/held-out split.

The text is not shipped in the repository: it is dumped once with the Debian reader (`bible -f Gen1:1-Rev22:21`,
one verse a line, 4,404,412 bytes) and cached in the git-ignored `data/` folder. The last 10 % is held out.
Tokens are raw bytes (ids 0-255); id 256 is the start token `<s>` that begins every training sequence and every
evaluated stream (it is what makes an attention sink form in the small model).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infmllm_ros.bench.common import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"
KJV_FILE = "kjv.txt"
KJV_RANGE = "Gen1:1-Rev22:21"
HELD_OUT_FRACTION = 0.1
BOS_ID = 256
VOCAB_SIZE = 257


class CorpusMissing(RuntimeError):
    pass


def dump_kjv(path: Path) -> Path:
    """Dumps the whole KJV with the Debian `bible` reader into `path` (written atomically)."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusMissing("the KJV text needs the Debian packages bible-kjv and bible-kjv-text: "
                            "run `apt-get install -y bible-kjv` (as root), or pass a text file with --text")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        subprocess.run([exe, "-f", KJV_RANGE], stdout=f, check=True, timeout=300)
    if tmp.stat().st_size < 1_000_000:
        raise CorpusMissing(f"`bible -f {KJV_RANGE}` wrote only {tmp.stat().st_size} bytes")
    tmp.replace(path)
    return path


def kjv_bytes(data_dir: Path | str = DATA_DIR) -> bytes:
    """The KJV text, dumped on first use and cached in data_dir."""
    path = Path(data_dir) / KJV_FILE
    if not path.exists():
        dump_kjv(path)
    return path.read_bytes()


def load_text(text_file: Path | str | None = None, data_dir: Path | str = DATA_DIR) -> bytes:
    return Path(text_file).read_bytes() if text_file else kjv_bytes(data_dir)


@dataclass(frozen=True)
class Split:
    train: bytes
    held_out: bytes


def split(data: bytes, held_out_fraction: float = HELD_OUT_FRACTION) -> Split:
    """First (1 - f) of the bytes for training, the last f held out (a contiguous tail: no verse leaks)."""
    cut = int(len(data) * (1.0 - held_out_fraction))
    return Split(train=data[:cut], held_out=data[cut:])


def byte_ids(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def byte_tokenizer():
    """A byte-level fast tokenizer (id = byte value, `<s>` = 256) that saves and loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab["<s>"] = BOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    hf.add_special_tokens({"bos_token": "<s>"})
    hf.model_max_length = 1 << 30
    return hf
