"""Write a tiny random OPT checkpoint (config.json + model.safetensors) for smoke runs: no download."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = OPTConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=128, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    model = OPTForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
