"""GGUF files of a Llama-architecture student, for llama.cpp, Ollama and LM Studio.

`write_gguf(student, out_file, qtype)` writes the model with the `gguf` package's
writer, following llama.cpp's `convert_hf_to_gguf.py` for Llama:
* tensors renamed to llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...), with the
  rows of Q and K permuted from Hugging Face's rotary layout (two halves) to llama.cpp's
  (interleaved pairs); `transformers`' GGUF loader undoes the same permutation;
* no `output.weight` when the embeddings are tied: llama.cpp then reuses `token_embd`;
* 1-D tensors (norms) stay F32; a 2-D tensor whose rows do not split into quantization
  blocks falls back to F16, as in llama.cpp's converter;
* for the 4-bit types the (tied) embedding/output matrix is kept at Q8_0, as llama.cpp's
  own quantizer keeps the output matrix at higher precision;
* the tokenizer as a gpt2-style BPE vocabulary: tokens, token types, merges, special
  ids and the chat template.

Only what the config says is assumed, so width-pruned, depth-pruned and LoRA-merged
students (all plain Llama folders) export the same way.

`check_gguf(gguf_file, student, blocks)` loads the file back with transformers' GGUF
reader (an implementation independent of this writer) and compares it with the PyTorch
student: max |Δlogit|, top-1 agreement, perplexity, size and sha256.

F16 parity is bounded by fp16 rounding of the weights, not by the writer: on
SmolLM2-135M the F16 file's max |Δlogit| (0.051 over 4x256 positions, logits up to ~42)
equals that of the PyTorch model with its weights rounded to fp16. Use "f32" where an
exact file is needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kd.exports.common import ExportError, ExportRequest, Writer
from kd.exports.parity import BlockLogits, artifact_row, parity, reference_logits, torch_logits
from kd.spec import GGUF_TYPES

log = logging.getLogger(__name__)


class GGUFExportError(RuntimeError):
    """The student cannot be written as GGUF; the message says why and what to do."""


def _types():
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
        "q5_0": (q.Q5_0, f.MOSTLY_Q5_0),
        "q5_1": (q.Q5_1, f.MOSTLY_Q5_1),
        "q4_0": (q.Q4_0, f.MOSTLY_Q4_0),
        "q4_1": (q.Q4_1, f.MOSTLY_Q4_1),
    }


# Types below 8 bits keep the embedding (= output head when tied) at Q8_0.
_LOW_BIT = ("q5_0", "q5_1", "q4_0", "q4_1")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def permute_qk(w: Tensor, n_head: int, n_head_kv: int | None = None) -> Tensor:
    """Hugging Face rotary layout -> llama.cpp's, per head (llama.cpp's `permute`).

    w: [n_head * head_dim, ...]; for K pass n_head_kv, which then sets the head count.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", "default") != "default"):
        raise GGUFExportError(
            f"rope type '{rope_type}' is not supported by this GGUF writer (default RoPE only); "
            "export safetensors and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("config has no rope_theta")
    return float(theta)


def gguf_tensors(state: dict[str, Tensor], config) -> list[tuple[str, Tensor]]:
    """(llama.cpp name, fp32 tensor) pairs in file order; Q/K permuted; lm_head dropped if tied."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in state
    out, unknown = [], []
    for name, t in state.items():
        t = t.detach().to(torch.float32).cpu()
        if name in _TOP_MAP:
            if name == "lm_head.weight" and tied:
                continue
            out.append((_TOP_MAP[name], t))
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in _LAYER_MAP:
            unknown.append(name)
            continue
        key = m.group(2)
        if key.startswith("self_attn.q_proj"):
            t = permute_qk(t, n_head, n_head)
        elif key.startswith("self_attn.k_proj"):
            t = permute_qk(t, n_head, n_kv)
        out.append((f"blk.{m.group(1)}.{_LAYER_MAP[key]}", t))
    if unknown:
        raise GGUFExportError(
            f"tensors with no llama.cpp name: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}; "
            "only plain Llama students (LoRA merged, no extra heads) can be written as GGUF"
        )
    return out


def check_architecture(config) -> None:
    """Raise GGUFExportError unless this writer can express `config` (a model config)."""
    if config.model_type != "llama":
        raise GGUFExportError(
            f"model_type '{config.model_type}' is not supported; this writer handles Llama "
            "(SmolLM, TinyLlama, Llama 2/3 without RoPE scaling)"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"hidden_act '{config.hidden_act}': llama.cpp's llama uses silu")
    _rope_theta(config)


def _tensor_type(name: str, t: Tensor, qtype: str):
    """The GGML type to store tensor `name` in for a file of type `qtype`."""
    import gguf

    types = _types()
    if t.ndim == 1 or qtype == "f32":
        return gguf.GGMLQuantizationType.F32
    want = types[qtype][0]
    if qtype in _LOW_BIT and name in ("token_embd.weight", "output.weight"):
        want = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    if t.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return want


def _pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's pre-tokenizer id. Students share the teacher's (SmolLM2) tokenizer."""
    vocab = tokenizer.get_vocab()
    if len(vocab) == 49152 and vocab.get("<|endoftext|>") == 0 and vocab.get("<|im_start|>") == 1:
        return "smollm"
    log.warning("unknown BPE pre-tokenizer; writing 'gpt-2' (llama.cpp may split text differently)")
    return "gpt-2"


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None = None) -> None:
    """gpt2-style BPE vocabulary, merges, special ids and chat template."""
    import gguf

    tt = gguf.TokenType
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFExportError(f"tokenizer model {spec['model']['type']} is not BPE")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padding)
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(tt.CONTROL if added[i].special else tt.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(tt.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for tok_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if tok_id is not None:
            add(int(tok_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _add_llama_params(writer, config, qtype: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_types()[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _load(student, tokenizer):
    """(state dict, config, tokenizer) from a folder or an in-memory model."""
    from transformers import AutoConfig, AutoTokenizer

    if isinstance(student, nn.Module):
        if tokenizer is None:
            raise GGUFExportError("pass the tokenizer along with an in-memory model")
        return student.state_dict(), student.config, tokenizer
    folder = Path(student)
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{folder} has no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return (
        state,
        AutoConfig.from_pretrained(folder),
        tokenizer or AutoTokenizer.from_pretrained(folder),
    )


def write_gguf(
    student: str | Path | nn.Module,
    out_file: str | Path,
    qtype: str = "f16",
    *,
    tokenizer=None,
    name: str = "llm2slm-student",
    pre_tokenizer: str | None = None,
) -> Path:
    """Write `student` (a Llama HF folder, or a model plus `tokenizer`) as a GGUF file."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type '{qtype}' is not one of {list(GGUF_TYPES)}")
    state, config, tok = _load(student, tokenizer)
    check_architecture(config)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _add_llama_params(writer, config, qtype, name)
        add_tokenizer(writer, tok, config.vocab_size, pre_tokenizer)
        for gname, t in gguf_tensors(state, config):
            ggml_type = _tensor_type(gname, t, qtype)
            data = gguf.quants.quantize(t.numpy(), ggml_type)
            writer.add_tensor(gname, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_file)
    return out_file


def load_gguf(gguf_file: str | Path) -> nn.Module:
    """The GGUF file as a plain fp32 PyTorch model, via transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM

    from kd import models

    p = Path(gguf_file)
    q = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    return models.rebuild_plain(q).eval()


def check_gguf(
    gguf_file: str | Path,
    student: nn.Module | BlockLogits,
    blocks: Tensor,
    *,
    fp32_bytes: int | None = None,
    batch_size: int = 4,
) -> dict[str, object]:
    """Round trip: load `gguf_file` back and compare it with the PyTorch `student`.

    blocks: [N, L] held-out token ids. Returns a row: max |Δlogit|, top-1 agreement,
    perplexity (and the student's), bytes, sha256. Reading the file back costs
    two passes of gguf's reader over the vocabulary (seconds on a quiet CPU).
    """
    loaded = load_gguf(gguf_file)
    row = parity(reference_logits(student), torch_logits(loaded), blocks, batch_size)
    return {"format": "gguf", **row, **artifact_row(gguf_file, fp32_bytes)}


def quantization_error(t: Tensor, qtype: str) -> float:
    """Relative RMS error of quantizing one fp32 matrix to `qtype` and back."""
    import gguf

    ggml_type = _tensor_type("x", t, qtype)
    x = t.detach().float().numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(x, ggml_type), ggml_type).reshape(x.shape)
    return float(np.sqrt(((back - x) ** 2).mean() / max((x**2).mean(), 1e-30)))


# ---- the job's formats "gguf-<type>": one file each under gguf/ ---------------------
DIR = "gguf"


def gguf_path(out: Path, qtype: str) -> Path:
    """Where the job writes format gguf-<qtype>: <out>/gguf/student-<qtype>.gguf."""
    return Path(out) / DIR / f"student-{qtype}.gguf"


def writer(qtype: str) -> Writer:
    """The export writer of format `gguf-<qtype>`; returns the file it wrote."""

    def write(req: ExportRequest) -> Path:
        try:
            return write_gguf(
                req.student, gguf_path(req.out, qtype), qtype, tokenizer=req.tokenizer
            )
        except GGUFExportError as e:
            raise ExportError(
                f"export_formats: gguf-{qtype} failed: {e}; or drop it from export_formats"
            ) from e

    return write


class GGUFRuntime:
    """A GGUF file read back with transformers' reader: `(input_ids, attention_mask) ->
    logits [B, L, V]`, for the job's round-trip check."""

    def __init__(self, path: str | Path):
        self.model = load_gguf(path)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
