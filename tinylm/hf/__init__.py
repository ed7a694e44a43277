"""Hugging Face formats, below `train/` and `export/` (both use them; docs/DESIGN.md, "Layers").

model.py      exact architecture and weight mapping to/from GPT-2, Llama, Qwen3, Mistral
tokenizer.py  tokenizer.json for char/BPE/GPT-2 tokenizers, and tokenizers from HF directories
"""
