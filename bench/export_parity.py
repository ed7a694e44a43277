"""Parity of exported models with stock transformers: max |logit difference| per family.

For each exportable family, a random model (weights drawn far from init, so logits are large)
is exported with `tinylm.export.writer.export_hf`, loaded with
`AutoModelForCausalLM.from_pretrained`, and both score the same random batch in fp32 on CPU.
Also the other way: a random stock model saved with `save_pretrained`, imported with
`train.init_from`. Prints one line per case; figures go in notes/issue-8-export.md.

    .venv/bin/python bench/export_parity.py [--d-model 256 --layers 4 --seq 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tinylm.config import Config, ModelConfig
from tinylm.export.writer import export_hf
from tinylm.hf.tokenizer import write_tokenizer_files
from tinylm.model import GPT
from tinylm.tokenizer import CharTokenizer
from tinylm.train.checkpoint import save_checkpoint
from tinylm.train.init_from import apply_init_from

CASES = {
    "gpt2": dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True),
    "llama (GQA, untied)": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False
    ),
    "llama (biases)": dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=True),
    "qwen3 (QK-norm, GQA)": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, qk_norm=True, n_kv_head=2
    ),
    "mistral (window 64)": dict(
        norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, sliding_window=64
    ),
}


def perturbed(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3 / (p.shape[-1] / 32) ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    tok = CharTokenizer([chr(c) for c in range(32, 127)])
    idx = torch.randint(
        0, tok.vocab_size, (4, args.seq), generator=torch.Generator().manual_seed(0)
    )
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, fp32 CPU")
    print(f"d_model {args.d_model}, {args.layers} layers, 8 heads, batch 4 x {args.seq} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fields in CASES.items():
            cfg = ModelConfig(
                vocab_size=tok.vocab_size,
                context_length=args.seq,
                n_layer=args.layers,
                n_head=8,
                d_model=args.d_model,
                **fields,
            )
            torch.manual_seed(0)
            model = GPT(cfg)
            perturbed(model)
            model.eval()
            run = tmp / name.split()[0]
            save_checkpoint(
                run / "checkpoints",
                1,
                model_state=model.state_dict(),
                train_state={},
                config=Config(model=cfg),
                tokenizer=tok,
            )
            out = export_hf(run, tmp / f"{run.name}-hf", force=True).out
            hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                ours = model(idx)[0]
                theirs = hf(idx).logits
            diff = (ours - theirs).abs().max().item()
            print(
                f"export {name:<22} -> {type(hf).__name__:<20} max|logit diff| {diff:.2e}"
                f"  (max|logit| {ours.abs().max().item():.1f})"
            )

            # the other way: the stock model saved by transformers, imported into tinylm
            perturbed(hf)
            back_dir = tmp / f"{run.name}-hf-back"
            hf.save_pretrained(back_dir)
            write_tokenizer_files(tok, back_dir, args.seq)
            c = Config()
            c.train.init_from = str(back_dir)
            t0 = time.perf_counter()
            source = apply_init_from(c)
            back = GPT(c.model)
            back.load_state_dict(source.model_state)
            back.eval()
            with torch.no_grad():
                diff = (back(idx)[0] - hf(idx).logits).abs().max().item()
            print(
                f"import {type(hf).__name__:<22} -> tinylm {'':<13} max|logit diff| {diff:.2e}"
                f"  (import {time.perf_counter() - t0:.2f} s)"
            )


if __name__ == "__main__":
    main()
