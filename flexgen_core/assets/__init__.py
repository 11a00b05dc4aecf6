"""Files shipped inside the package.

`TINY_MODEL_DIR` is the embedded default model of `make demo` and `flexgen eval`: a small pre-LayerNorm OPT
(Hugging Face layout: config.json, generation_config.json, fp16 model.safetensors, tokenizer.json) trained
by `scripts/train_tiny_model.py` on the procedural scenarios' train splits; `TRAINING.md` there has its
recipe and scores. Prompts start with BOS `</s>` (id 2), as for every OPT model.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_DIR: Path = Path(__file__).resolve().parent / "tiny-opt"

__all__ = ["TINY_MODEL_DIR"]
