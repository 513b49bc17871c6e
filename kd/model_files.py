"""What a model is, read from its config and tokenizer files only: no torch, no weights.

`read_model(name)` accepts every model name a `DistillConfig` accepts and returns the
decoder's shape (`Arch`) and its tokenizer's vocabulary (`Vocab`):

* `embedded:smollm2-135m`: the converted folder in the llm2slm cache when it exists
  (`kd.models.local_folder` writes it on first use), else the GGUF's metadata;
* a local Hugging Face folder: `config.json` plus `tokenizer.json` (or `vocab.json`);
* a `.gguf` file: its metadata header, parsed here (the `gguf` package's reader parses
  every array and takes ~7 s for SmolLM2's 49k tokens and merges; this takes ~0.2 s);
* a Hub id: `config.json` and the tokenizer files through huggingface_hub's cache.

Nothing here imports torch: the preflight that uses it must answer in under 5 seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kd import names
from kd.names import converted_folder


class ModelFilesError(ValueError):
    """A model's config or tokenizer could not be read; the message says how to fix it."""


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder's shape: everything the parameter and memory counts need."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_rows: int  # rows of the embedding / LM head (may exceed the tokenizer's size)
    tied: bool  # LM head shares the embedding matrix
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    def with_layers(self, n: int) -> Arch:
        return replace(self, layers=n)

    def linears(self) -> list[tuple[int, int, bool]]:
        """(in, out, bias) of every linear layer of one decoder layer."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [
            (h, q, self.qkv_bias),
            (h, kv, self.qkv_bias),
            (h, kv, self.qkv_bias),
            (q, h, self.o_bias),
            (h, i, self.mlp_bias),  # gate
            (h, i, self.mlp_bias),  # up
            (i, h, self.mlp_bias),  # down
        ]

    def layer_params(self) -> int:
        linear = sum(a * b + (b if bias else 0) for a, b, bias in self.linears())
        return linear + 2 * self.hidden  # two RMSNorm weights

    def params(self) -> int:
        """Unique parameters (a tied head counted once), as `kd.models.count_params`."""
        embed = self.vocab_rows * self.hidden
        head = 0 if self.tied else embed
        return embed + head + self.layers * self.layer_params() + self.hidden  # final norm

    def lora_params(self, r: int) -> int:
        """peft's target_modules='all-linear': A [r, in] and B [out, r] per decoder linear."""
        return self.layers * sum(r * (a + b) for a, b, _ in self.linears())


class Vocab:
    """A tokenizer's token -> id table (added tokens included), parsed only when asked.

    `digest` hashes the tokenizer file's bytes: equal digests mean the same tokenizer
    without parsing (a derived student, two copies of one model). `tokens` parses the
    file (~0.5 s for a 50k-token tokenizer.json) and is None for sentencepiece files.
    """

    def __init__(self, where: str, digest: str, load: Callable[[], dict[str, int] | None]):
        self.where, self.digest, self._load = where, digest, load

    @functools.cached_property
    def tokens(self) -> dict[str, int] | None:
        return self._load()

    @property
    def size(self) -> int | None:
        """len(tokenizer.get_vocab()): the tokenizer's real vocabulary."""
        return None if self.tokens is None else len(self.tokens)

    def same_as(self, other: Vocab) -> bool:
        return self.digest == other.digest or (
            self.tokens is not None and self.tokens == other.tokens
        )


@dataclass(frozen=True)
class ModelFiles:
    name: str
    where: str  # the folder, file or hub id the numbers were read from
    arch: Arch
    vocab: Vocab


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------
# Hugging Face config.json and tokenizer files
# ---------------------------------------------------------------------------------
def arch_from_hf(cfg: dict, where: str) -> Arch:
    """The Arch of a Hugging Face `config.json` (text part of multimodal configs too)."""
    cfg = cfg.get("text_config") or cfg
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        arch = Arch(
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_rows=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", True)),
            # Qwen2 hard-codes q/k/v biases; Llama-style configs say so in attention_bias.
            qkv_bias=bool(cfg.get("attention_bias")) or cfg.get("model_type") == "qwen2",
            o_bias=bool(cfg.get("attention_bias")),
            mlp_bias=bool(cfg.get("mlp_bias")),
            model_type=str(cfg.get("model_type", "?")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFilesError(
            f"{where}: config.json lacks {e} (needs hidden_size, num_attention_heads, "
            "num_hidden_layers, vocab_size): preflight supports decoder-only causal LMs"
        ) from None
    return arch


def _tokenizer_json_table(path: Path) -> dict[str, int]:
    data = json.loads(path.read_text(encoding="utf-8"))
    raw = (data.get("model") or {}).get("vocab")
    if isinstance(raw, dict):  # BPE, WordPiece, WordLevel
        tokens = {str(t): int(i) for t, i in raw.items()}
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...] in id order
        tokens = {str(p[0]): i for i, p in enumerate(raw)}
    else:
        raise ModelFilesError(f"{path}: no model.vocab table; is this a tokenizer.json?")
    for added in data.get("added_tokens") or []:
        tokens[str(added["content"])] = int(added["id"])
    return tokens


def _vocab_json_table(folder: Path) -> dict[str, int]:
    tokens = {str(t): int(i) for t, i in json.loads((folder / "vocab.json").read_text()).items()}
    if (folder / "added_tokens.json").is_file():
        tokens.update(json.loads((folder / "added_tokens.json").read_text()))
    return tokens


def vocab_from_folder(folder: Path) -> Vocab:
    """From tokenizer.json, else vocab.json (+ added_tokens.json), else hash tokenizer.model."""
    path = folder / "tokenizer.json"
    if path.is_file():
        return Vocab(str(path), _file_digest(path), lambda: _tokenizer_json_table(path))
    if (folder / "vocab.json").is_file():
        path = folder / "vocab.json"
        return Vocab(str(path), _file_digest(path), lambda: _vocab_json_table(folder))
    if (folder / "tokenizer.model").is_file():  # sentencepiece: compared by file content
        path = folder / "tokenizer.model"
        return Vocab(str(path), _file_digest(path), lambda: None)
    raise ModelFilesError(
        f"{folder}: no tokenizer.json, vocab.json or tokenizer.model; save the tokenizer "
        "next to the model (tokenizer.save_pretrained(folder))"
    )


def read_folder(name: str, folder: Path) -> ModelFiles:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFilesError(f"folder '{name}' has no config.json: not a model folder")
    # Cached per file version: the API runs a preflight per request on the same models.
    stamp = tuple(
        (p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
        for p in (cfg_path, folder / "tokenizer.json", folder / "vocab.json")
    )
    return replace(_read_folder(str(folder.resolve()), stamp), name=name)


@functools.lru_cache(maxsize=32)
def _read_folder(folder: str, stamp: tuple) -> ModelFiles:
    arch = arch_from_hf(json.loads((Path(folder) / "config.json").read_text()), folder)
    return ModelFiles(folder, folder, arch, vocab_from_folder(Path(folder)))


def read_hub(repo: str) -> ModelFiles:
    """config.json and tokenizer files of a Hub repo (cached, or fetched: a few KB-MB)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ModelFilesError(f"'{repo}': huggingface_hub is needed to read Hub ids") from e
    try:
        config = Path(hf_hub_download(repo, "config.json", etag_timeout=3))
    except Exception as e:  # offline, gated, missing: all say "cannot read"
        raise ModelFilesError(
            f"cannot read config.json of '{repo}' from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Use a reachable Hub id, a local "
            "model folder or a .gguf file"
        ) from None
    for fname in ("tokenizer.json", "vocab.json", "tokenizer.model"):
        try:
            hf_hub_download(repo, fname, etag_timeout=3)
        except EntryNotFoundError:
            continue
        except Exception:
            continue
        break
    return read_folder(repo, config.parent)


# ---------------------------------------------------------------------------------
# GGUF metadata (header only: key/values and tensor names and shapes)
# ---------------------------------------------------------------------------------
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.take("Q")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.take("I"), self.take("Q")
            if itype == 8:
                return [self.string() for _ in range(count)]
            fmt = _SCALARS[itype]
            size = struct.calcsize("<" + fmt)
            out = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
            self.pos += size * count
            return out
        return self.take(_SCALARS[vtype])


def gguf_metadata(path: str | Path) -> tuple[dict, dict[str, list[int]]]:
    """(key -> value, tensor name -> shape) from a GGUF v2/v3 header; weights are not read."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm)  # type: ignore[arg-type]  # only the header pages are touched
        if r.take("4s") != b"GGUF" or r.take("I") not in (2, 3):
            raise ModelFilesError(f"{path}: not a GGUF v2/v3 file")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        kv = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.take("I"))
        shapes = {}
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.take("Q") for _ in range(r.take("I"))]
            r.take("I"), r.take("Q")  # ggml type, data offset
            shapes[name] = dims
    return kv, shapes


def read_gguf(name: str, path: Path) -> ModelFiles:
    kv, shapes = gguf_metadata(path)
    a = kv.get("general.architecture", "llama")
    tokens_list = kv.get("tokenizer.ggml.tokens") or []
    try:
        hidden, heads = int(kv[f"{a}.embedding_length"]), int(kv[f"{a}.attention.head_count"])
        arch = Arch(
            layers=int(kv[f"{a}.block_count"]),
            hidden=hidden,
            intermediate=int(kv[f"{a}.feed_forward_length"]),
            heads=heads,
            kv_heads=int(kv.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(kv.get(f"{a}.attention.key_length", hidden // heads)),
            vocab_rows=int(shapes["token_embd.weight"][1]),
            tied="output.weight" not in shapes,
            qkv_bias="blk.0.attn_q.bias" in shapes,
            o_bias="blk.0.attn_output.bias" in shapes,
            mlp_bias="blk.0.ffn_up.bias" in shapes,
            model_type=a,
        )
    except KeyError as e:
        raise ModelFilesError(f"{path}: GGUF metadata lacks {e}; not a decoder-only LM") from None
    digest = hashlib.sha256("\n".join(tokens_list).encode()).hexdigest()[:16]
    vocab = Vocab(str(path), digest, lambda: {t: i for i, t in enumerate(tokens_list)})
    return ModelFiles(name, str(path), arch, vocab)


# ---------------------------------------------------------------------------------
# Names -> files
# ---------------------------------------------------------------------------------
def embedded_path(name: str) -> Path:
    """The GGUF file an `embedded:` name stands for (kd.names)."""
    return names.embedded_path(name, ModelFilesError)


def _read_gguf_or_cached(name: str, path: Path) -> ModelFiles:
    folder = converted_folder(str(path))
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return replace(read_folder(name, folder), where=str(path))
    return read_gguf(name, path)


def read_model(name: str, relative_ok: bool | None = None) -> ModelFiles:
    """Config shape and tokenizer of any model name a DistillConfig accepts (not 'teacher').

    relative_ok: False for the API's preflight (a relative path is refused, `kd.names`);
    None decides by the job's origin."""
    src = names.resolve_model(name, ModelFilesError, relative_ok)
    if src.kind == "gguf":
        return _read_gguf_or_cached(name, Path(src.location))
    if src.kind == "folder":
        return read_folder(name, Path(src.location))
    return read_hub(name)
