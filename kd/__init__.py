"""llm2slm's distillation core: plain PyTorch, no Ray.

Modules: config (the job spec), losses (the hybrid KD loss), models (loading, student
derivation, LoRA), data (corpora, packing, held-out split), train (the loop and its
resumable state), evaluate (perplexity and agreement), export (the saved student).
"""

from kd.config import DistillConfig

__all__ = ["DistillConfig"]
__version__ = "0.1.0"
