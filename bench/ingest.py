"""The corpus pipeline (data_pipeline='ray_data') on a synthetic corpus at two sizes.

    python bench/ingest.py                        # 20 MB and 200 MB of text
    python bench/ingest.py --sizes-mb 5 50 --rss-batches 2000

For each size it writes a .jsonl corpus of word documents (a Zipf-like vocabulary, so
the tokenizer sees realistic words), then:

* ingest tokens/s with 1 and with 2 tokenizer actors (a fresh storage root each time,
  so both tokenize everything): `train_job.ingest.ingest` wall time, split included;
* the training worker's peak RSS: a Ray Train worker (TorchTrainer, 1 worker) that does
  exactly the data part of `train_job.worker` (`stream.worker_data`, then pulls
  batches through `get_dataset_shard`) reports its ru_maxrss and its peak private
  (RssAnon) and shared (RssShmem: Ray's object store) memory; the same worker on
  data_pipeline='local' (`kd.data.build_datasets`, which every worker runs today)
  for contrast. Models are left out: they are the same at every corpus size;
* the time to start a second job on the same corpus: `ingest.prepare` again (it finds
  the manifest) plus building the trainer's datasets, and its tokenizer calls (0).

Prints a table and writes bench/results/ingest.json. The teacher is the embedded
SmolLM2-135M (its tokenizer only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """A .jsonl of documents of 50-800 words drawn from a 5,000-word Zipf vocabulary."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(5000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    target, size, n = int(mb * 1e6), 0, 0
    with path.open("w") as f:
        while size < target:
            words = rng.choice(len(vocab), rng.integers(50, 800), p=p)
            line = json.dumps({"text": " ".join(vocab[i] for i in words) + "."}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def _rss_parts() -> dict[str, int]:
    """kB of this process's resident memory by kind: private (RssAnon) and shared
    memory mappings (RssShmem, where the Ray object store lives)."""
    parts = {"RssAnon": 0, "RssShmem": 0}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in parts:
                parts[key] = int(line.split()[1])
    return parts


def _rss_loop(config: dict) -> None:
    """A Ray Train worker's data part: build or stream the blocks, pull batches."""
    import ray.train

    from kd.config import DistillConfig
    from kd.data import BlockSampler, build_datasets
    from train_job import stream

    cfg = DistillConfig.model_validate(config["config"])
    t0 = time.perf_counter()
    if cfg.data_pipeline == "local":
        from transformers import AutoTokenizer

        from kd.models import local_folder

        tok = AutoTokenizer.from_pretrained(local_folder(cfg.teacher_model))
        train, _ = build_datasets(cfg, tok)
        sampler = BlockSampler(len(train), cfg.per_device_batch_size, cfg.seed)

        def pull():
            return train.batch(sampler.next_indices())
    else:
        data = stream.worker_data(config, cfg, 0, 1)
        sampler, train = data["sampler"], data["data"][0]

        def pull():
            return train.batch(sampler.next_indices())

    n = min(config["batches"], sampler.batches_per_epoch)
    # ru_maxrss also counts the object store's shared pages that the worker has touched
    # (Ray Data hands it batches through plasma): that part grows with the corpus and is
    # the store's, not the worker's. So the private (anonymous) part is sampled too.
    peak = _rss_parts()
    for _ in range(n):
        pull()
        now = _rss_parts()
        peak = {k: max(v, now[k]) for k, v in peak.items()}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"peak_rss_mb": rss_mb, "batches": n, "s": time.perf_counter() - t0}
    out |= {f"peak_{k.lower()}_mb": round(v / 1024, 1) for k, v in peak.items()}
    Path(config["result"]).write_text(json.dumps(out))  # Train V2 keeps no metrics-only report
    ray.train.report(out)


def worker_rss(cfg, root: str, corpus: dict | None, batches: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train_job.stream import trainer_datasets

    result = tempfile.mktemp(prefix="bench-ingest-rss-", suffix=".json")
    trainer = TorchTrainer(
        _rss_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "storage": root,
            "corpus": corpus,
            "result": result,
            "batches": batches,
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-ingest-ray-")),
        **trainer_datasets(cfg, root, corpus),
    )
    trainer.fit()
    return json.loads(Path(result).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs=2, default=[20, 200])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rss-batches", type=int, default=100_000, help="cap per RSS run")
    ap.add_argument("--skip-local-rss", action="store_true", help="no local-pipeline contrast")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per actor
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

    import ray
    from transformers import AutoTokenizer

    from jobs.storage import Storage
    from kd.config import DistillConfig
    from kd.models import local_folder
    from train_job import ingest, stream

    for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s raylet wait
        try:
            ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:
            print(f"ray.init failed ({e}); retrying", file=sys.stderr, flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    tok = AutoTokenizer.from_pretrained(local_folder("embedded:smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    rows = []
    for mb in args.sizes_mb:
        data = work / f"corpus-{mb:g}mb.jsonl"
        n_docs = make_corpus(data, mb)
        cfg = DistillConfig(dataset=str(data), max_seq_len=args.seq_len, data_pipeline="ray_data",
                            per_device_batch_size=args.batch_size)  # fmt: skip
        row = {"corpus_mb": mb, "documents": n_docs}
        for cpus in (1, 2):
            store = Storage(work / f"store-{mb:g}-{cpus}")
            t0 = time.perf_counter()
            c = ingest.ingest(cfg, store, tok, num_cpus=cpus)
            s = time.perf_counter() - t0
            tokens = c["manifest"]["train"]["tokens"] + c["manifest"]["eval"]["tokens"]
            row[f"ingest_s_{cpus}cpu"] = round(s, 2)
            row[f"tokens_per_s_{cpus}cpu"] = round(tokens / s)
            row["tokens"] = tokens
            row["shard_mb"] = round(ingest.summary(c)["shard_bytes"] / 1e6, 1)
        t0 = time.perf_counter()
        again = ingest.prepare(cfg, store)
        stream.trainer_datasets(cfg, store.root, again)
        row["second_job_start_s"] = round(time.perf_counter() - t0, 2)
        row["second_job_tokenizer_calls"] = again["tokenizer_calls"]
        m = worker_rss(cfg, store.root, again, args.rss_batches)
        row["worker_peak_rss_mb_ray_data"] = round(m["peak_rss_mb"], 1)
        row["worker_peak_anon_mb_ray_data"] = m["peak_rssanon_mb"]
        row["worker_peak_shmem_mb_ray_data"] = m["peak_rssshmem_mb"]
        row["worker_batches_ray_data"] = m["batches"]
        if not args.skip_local_rss:
            local = cfg.model_copy(update={"data_pipeline": "local"})
            m = worker_rss(local, store.root, None, args.rss_batches)
            row["worker_peak_rss_mb_local"] = round(m["peak_rss_mb"], 1)
            row["worker_peak_anon_mb_local"] = m["peak_rssanon_mb"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    a, b = rows
    summary = {
        "command": "python bench/ingest.py " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
        "rss_apart_mb_ray_data": round(
            b["worker_peak_rss_mb_ray_data"] - a["worker_peak_rss_mb_ray_data"], 1
        ),
        "anon_apart_mb_ray_data": round(
            b["worker_peak_anon_mb_ray_data"] - a["worker_peak_anon_mb_ray_data"], 1
        ),
        "cpus_on_machine": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    cols = [k for k in rows[0] if k != "documents"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in cols) + " |")
    print(f"\nworker RSS apart (ray_data): {summary['rss_apart_mb_ray_data']} MB; private "
          f"(RssAnon) apart: {summary['anon_apart_mb_ray_data']} MB")  # fmt: skip
    print(f"command: {summary['command']}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
