"""llm2slm's distillation core: plain PyTorch, no Ray. `import kd` (and kd.config)
loads neither torch nor Ray: the HTTP API and the client use the job spec from here.

Modules:
    config    the job spec `DistillConfig` and config_changes (what a resume may change)
              (no torch)
    spec      the spec's names and string forms: LOSS_TERMS, OBJECTIVES,
              LAYER_SELECTIONS, EXPORT_FORMATS, MODEL_DATA_FIELDS, '60M', 'teacher:...'
              (pure Python; also importable from kd.config)
    config_checks  the cross-field rules DistillConfig validates with (no torch)
    fmt       one number format for progress lines, report.md and the HTML page (no torch)
    sources   reading corpora (embedded, local files and folders, HF datasets) as documents
    data      packing into blocks, the held-out split of whole documents, the sampler
    preflight before anything loads: tokenizers match, the memory plan fits (no torch)
    names     what a model or dataset name is (classify: embedded, local, Hub, S3), and
              where a model loads from (no torch)
    model_files  a model's config and tokenizer read from its files, GGUF header included
    memory_plan  bytes per worker: weights, gradients, optimizer, activations, chunks
    models    loading teachers/students (HF folder, .gguf, embedded), DistillForward, LoRA
    student   the student: loaded, or derived from the teacher by selecting layers
    width     width pruning: activation importance, heads/channels/neurons sliced (Minitron)
    shapes    exact parameter counts and candidate student shapes under a budget (no torch)
    losses    the hybrid KD loss: a sum of vocabulary, hidden-state and attention terms
    vocab     the chunked, closed-form-gradient vocabulary terms (fused LM head or logits)
    vocab_chunk  one chunk of them: D, CE(argmax teacher), CE(data) and dL/ds
    teacher_signal  a stored teacher signal (exact hidden state or top-k) in place of
              the teacher forward
    optim     AdamW and the learning-rate schedule
    run       `Run`: what one worker holds during training, and its precision
    step      one optimizer step: micro-batches weighted by token counts over the ranks,
              clip and AdamW step (fp16 loss scaling), the window of logged metrics
    train     setup() -> Run, the loop, its schedule and the events it emits
    rollout   on-policy batches: prompts -> generated continuations with a loss mask (GKD)
    prompts   prompt sets: packed-block prefixes, a prompt column, the embedded prompts
    genquality  generation quality of held-out prompts: teacher NLL, reverse KL, samples
    state     the resumable state of a Run (state_dict / load_state_dict)
    evaluate  held-out perplexity, teacher agreement, KL, logits parity
    exports   the student in each format (safetensors, ONNX, INT8, GGUF, ONNX Runtime
              GenAI) with parity checks, and the manifest
    report    report.json / report.md numbers (size, speed) and the model card
    curves    curves.png, TensorBoard and MLflow from the logged history
    pipeline  what runs around the loop: evaluation before, exports and reports after
    cli       `python -m kd`: one distillation in this process
"""

from kd.config import DistillConfig

__all__ = ["DistillConfig"]
__version__ = "0.1.0"
