"""The HF-format SFT stage: Llama-3 chat data, assistant-only loss, packed conversations (TRL)."""
