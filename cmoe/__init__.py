"""cmoe: continual mixture-of-experts for vision-language models (LLaVA-CMoE / CoPE)."""

__version__ = "0.1.0"
