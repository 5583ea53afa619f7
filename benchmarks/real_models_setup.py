"""Rebuild real models on a bare GPU machine from carried parts: reassemble, check SHA-256, save HF folders.

The device machine has no network and each call carries at most 64 MiB, so each catalogue GGUF file travels as
fixed-size parts (``split -b``) in a folder of its own. For every ``--file NAME:SHA256`` this script
concatenates ``<parts>/<NAME>/*`` in name order into ``<dest>/<NAME>.gguf``, checks its SHA-256, then loads it
once with transformers (dequantized to bf16) and saves it as a safetensors folder ``<dest>/<NAME>`` (plus its
tokenizer), so later calls load it in seconds with ``--model <dest>/<NAME>``.

    python benchmarks/real_models_setup.py --parts ~/parts --dest ~/models \\
        --file qwen2.5-coder-1.5b:cc324a... --file qwen2.5-coder-0.5b:1d9614...
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_CHUNK = 1 << 24


def assemble(parts: list[Path], path: Path, sha256: str) -> Path:
    """Concatenate ``parts`` into ``path``; ValueError when the result does not hash to ``sha256``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"{path.name}: reassembled SHA-256 {digest.hexdigest()} from {len(parts)} parts, expected {sha256}"
        )
    print(f"{path.name}: {size} bytes from {len(parts)} parts, SHA-256 ok", flush=True)
    return path


def to_folder(gguf: Path, folder: Path) -> str:
    """Load ``gguf`` with transformers (bf16) and save it as a safetensors folder; returns a log line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseflash.integrations.models import save_safetensors

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.bfloat16
    )
    save_safetensors(model, tok, folder)
    return f"{folder}: saved in {time.perf_counter() - t0:.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", required=True, help="folder of the parts (concatenated in name order)")
    p.add_argument("--dest", required=True, help="where the .gguf files and model folders go")
    p.add_argument(
        "--file",
        action="append",
        required=True,
        metavar="NAME:SHA256",
        help="a model whose parts are in <parts>/<NAME>/",
    )
    args = p.parse_args(argv)
    parts_root = Path(args.parts).expanduser()
    dest = Path(args.dest).expanduser()
    ggufs, folders = [], []
    for spec in args.file:
        name, _, sha = spec.partition(":")
        parts = sorted((parts_root / name).iterdir()) if (parts_root / name).is_dir() else []
        if not parts or len(sha) != 64:
            print(f"--file {spec}: expected NAME:SHA256 with parts in {parts_root / name}", file=sys.stderr)
            return 2
        ggufs.append(assemble(parts, dest / f"{name}.gguf", sha))
        folders.append(dest / name)
    with ProcessPoolExecutor(len(ggufs)) as pool:
        for line in pool.map(to_folder, ggufs, folders):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
