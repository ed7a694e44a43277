"""The model card (README.md) of an exported model: what was trained, on what, how far, how well.

Facts come from the run directory: the resolved config in the checkpoint, the train and eval
records and the `start` event (which holds the exact `tinylm train` command) in `metrics.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.config import Config


def run_facts(run_dir: Path | None, step: int) -> dict[str, Any]:
    """Tokens trained, the last validation figures and the command, up to checkpoint `step`."""
    facts: dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if metrics is None or not metrics.is_file():
        return facts
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if r.get("kind") == "event" and r.get("event") == "start" and r.get("command"):
            facts.setdefault("command", r["command"])  # the first start: how the run was begun
        if r.get("step", 0) > step:
            continue
        if r.get("kind") == "train" and "tokens" in r:
            facts["tokens"] = r["tokens"]
        elif r.get("kind") == "eval" and "val/loss" in r:
            facts["val_loss"] = r["val/loss"]
            facts["val_bpb"] = r.get("val/bits_per_byte")
            facts["val_step"] = r["step"]
    return facts


def _data_description(cfg: Config) -> str:
    d = cfg.data
    if d.mix:
        return ", ".join(f"`{s.path}` (weight {s.weight:g})" for s in d.mix)
    return f"`{d.train}`"


def model_card(
    cfg: Config,
    *,
    family: str,
    class_name: str,
    num_params: int,
    tokenizer_desc: str,
    step: int,
    facts: dict[str, Any],
    export_command: str,
    dtype_name: str,
) -> str:
    """README.md text with a metadata header that the Hugging Face hub reads."""
    m = cfg.model
    tokens = facts.get("tokens")
    val = "not recorded (no evaluation up to this checkpoint)"
    if facts.get("val_loss") is not None:
        val = f"{facts['val_loss']:.4f} (step {facts['val_step']})"
        if facts.get("val_bpb") is not None:
            val += f", {facts['val_bpb']:.4f} bits per byte"
    train_cmd = facts.get("command") or "not recorded (the run predates command recording)"
    arch = (
        f"{m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads"
        f" ({m.kv_heads} key/value heads), MLP {m.mlp} width {m.ff_dim}, {m.norm}, "
        f"{'RoPE (theta ' + format(m.rope_theta, 'g') + ')' if m.pos_emb == 'rope' else 'learned positions'}"
        f"{', QK-norm' if m.qk_norm else ''}"
        f"{f', sliding window {m.sliding_window}' if m.sliding_window else ''}"
        f", {'tied' if m.tie_embeddings else 'untied'} embeddings, context {m.context_length}"
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- tinylm
- {family}
---

# {cfg.run_name or "tinylm model"}

A small language model trained with tinylm and exported to the stock `transformers` class `{class_name}` (no custom code; logits match tinylm's within 1e-4 in
fp32).

| | |
|---|---|
| architecture | {arch} |
| parameters | {num_params:,} |
| tokenizer | {tokenizer_desc} |
| training data | {_data_description(cfg)} |
| trained for | {step:,} steps{f", {tokens:,} tokens" if tokens else ""} |
| final validation loss | {val} |
| weights | {dtype_name} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("THIS_DIR")
model = AutoModelForCausalLM.from_pretrained("THIS_DIR")
ids = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=50)
print(tok.decode(ids[0]))
```

## How it was made

Trained with: `{train_cmd}`
(the fully resolved configuration is in tinylm's run directory, `config.yaml`).

Exported with: `{export_command}`
"""
