"""llm2slm's distillation core: plain PyTorch, no Ray. `import kd` (and kd.config)
loads neither torch nor Ray: the HTTP API and the client use the job spec from here.

Modules:
    config    the job spec `DistillConfig`; LOSS_TERMS, OBJECTIVES, LAYER_SELECTIONS (no torch)
    fmt       one number format for progress lines, report.md and the HTML page (no torch)
    data      corpora, packing into blocks, the held-out split, the resumable sampler
    models    loading teachers/students (HF folder, .gguf, embedded), DistillForward, LoRA
    student   the student: loaded, or derived from the teacher by selecting layers
    losses    the hybrid KD loss: a sum of vocabulary, hidden-state and attention terms
    vocab     the chunked, closed-form-gradient vocabulary terms (fused LM head or logits)
    optim     AdamW and the learning-rate schedule
    train     setup() -> Run, the loop, its schedule and the events it emits
    state     the resumable state of a Run (state_dict / load_state_dict)
    evaluate  held-out perplexity, teacher agreement, KL, logits parity
    exports   the student in each format (safetensors, ONNX, INT8) and the manifest
    report    report.json / report.md numbers (size, speed) and the model card
    curves    curves.png, TensorBoard and MLflow from the logged history
    pipeline  what runs around the loop: evaluation before, exports and reports after
    cli       `python -m kd`: one distillation in this process
"""

from kd.config import DistillConfig

__all__ = ["DistillConfig"]
__version__ = "0.1.0"
