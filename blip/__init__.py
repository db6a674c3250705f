"""BLIP model library: pure PyTorch + tokenizer; no Ray, no I/O beyond checkpoints."""
