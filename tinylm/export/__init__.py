"""Models that leave tinylm and models that come in: Hugging Face export, import, fine-tuning.

hf.py            exact architecture and weight mapping to/from GPT-2, Llama, Qwen3, Mistral
hf_tokenizer.py  tokenizer.json for char/BPE/GPT-2 tokenizers, and tokenizers from HF dirs
card.py          the model card (README.md) of an exported model
writer.py        `export_hf`: the atomic export of a run's checkpoint
init_from.py     `train.init_from`: weights, model config and tokenizer of a run, checkpoint,
                 HF directory or `hf:NAME`, for a new run
cli.py           `tinylm export`
"""
