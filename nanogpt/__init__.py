"""A character-level (or BPE) GPT on Tiny Shakespeare, trained as a DVC pipeline."""
