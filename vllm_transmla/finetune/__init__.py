"""Recovery training: distil a compressed (converted) checkpoint back toward its source model.

`data` packs text into training windows, `trainable` chooses which weights train, `trainer` is a
transformers Trainer with the distillation loss, and `run` ties them together for `transmla finetune`.
Serving never imports this package.
"""
