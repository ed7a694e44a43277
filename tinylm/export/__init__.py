"""Models that leave tinylm and models that come in: Hugging Face export, import, fine-tuning.

The formats themselves (weights, tokenizers) are in `tinylm/hf/`, and `train.init_from` (the import
side, used by the trainer) is `tinylm/train/init_from.py`: both sit below this package.

card.py          the model card (README.md) of an exported model
writer.py        `export_hf`: the atomic export of a run's checkpoint
cli.py           `tinylm export`
"""
