"""The corpus pipeline on Ray Data: tokenize and pack once, write shards, stream them.

`data_pipeline="ray_data"` jobs run `ingest(cfg, storage)` in the job driver before the
TorchTrainer starts. It decides the split exactly as `kd.data.plan_split` does (on the
same documents and seed), tokenizes both sides with `map_batches` over the cluster's
CPUs (one tokenizer per actor), cuts the EOS-separated token stream into
`max_seq_len` blocks in document order and writes them as Parquet shards. A later job
whose fingerprint is the same finds the manifest and tokenizes nothing.

Shard format (stable: the teacher-signal cache reads it)
--------------------------------------------------------
Everything lives under the job storage root (shared folder or S3, `jobs.storage`)::

    corpus/<key>/manifest.json           written last: its presence means complete
    corpus/<key>/train/shard-00000.parquet
    corpus/<key>/train/shard-00001.parquet ...
    corpus/<key>/eval/shard-00000.parquet ...

`<key>` is the first 20 hex digits of the sha256 of the canonical JSON of the
fingerprint (`manifest["fingerprint"]`): format version, dataset identity (name,
subset, split, text column, max_texts, document_separator, eval_dataset/subset/split/
text column; for local files every file's relative path, size and mtime_ns; for
'embedded' the sha256 of its text; for hub datasets the resolved revision when known),
tokenizer (sha256 of the files `save_pretrained` writes, plus its class and eos id),
max_seq_len, seed and eval_fraction.

Each shard is one Parquet file, rows in block order, with three columns:

* `block`      int64  the block's index on its side (train or eval), 0..blocks-1;
                      shard i holds blocks [i * shard_blocks, (i+1) * shard_blocks)
* `input_ids`  fixed_size_list<int32>[max_seq_len]  token ids; the tail of the last
                      block of a side is padded with eos_id (as `kd.data.pack`)
* `length`     int32  real tokens in the block: max_seq_len for every block but the
                      last of a side; attention_mask = (arange(max_seq_len) < length)

So the blocks of a side, concatenated in `block` order, equal `kd.data.pack` on that
side's documents bit for bit (input_ids, and attention_mask from `length`).

manifest.json::

    {"format": "llm2slm.corpus/1", "key": str, "created_at": float (unix s),
     "max_seq_len": int, "shard_blocks": int, "eos_id": int,
     "fingerprint": {...the inputs above...},
     "split": {...the description kd.data.build_datasets attaches (method, sources,
               train/eval documents, tokens, blocks, eval_names)...},
     "train": {"blocks": int, "tokens": int, "documents": int,
               "shards": [{"path": "train/shard-00000.parquet", "blocks": int,
                           "tokens": int, "bytes": int}, ...]},
     "eval":  {...same fields...},
     "counters": {"tokenizer_calls": int, "documents_tokenized": int, "ingest_s": float}}

Shard paths in the manifest are relative to `corpus/<key>/`.
"""

from __future__ import annotations

FORMAT = "llm2slm.corpus/1"
CORPUS_PREFIX = "corpus"  # storage key prefix of every corpus cache
MANIFEST = "manifest.json"
SHARD_BLOCKS = 4096  # blocks per shard: 4 MiB of int32 ids at max_seq_len 256
