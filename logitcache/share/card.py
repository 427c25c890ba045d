"""The dataset card (README.md) pushed beside a cache, so `datasets` and the Hub can describe it."""

from __future__ import annotations

from logitcache import format as fmt

CARD_NAME = "README.md"


# -- the dataset card --------------------------------------------------------------------------


def dataset_card(manifest: dict, title: str) -> str:
    """README.md for the Hub: `configs:` points `datasets` at exactly the listed shards, and the
    body restates the manifest's facts (the manifest stays the source of truth)."""
    import yaml

    m = manifest
    shards = sorted(m.shards, key=lambda e: e.index)
    front = {"configs": [{"config_name": "default",
                          "data_files": [{"split": "train", "path": [e.name for e in shards]}]}],
             "tags": ["logitcache", "knowledge-distillation", "teacher-logits"]}
    t, d, enc = m.teacher, m.data, m.encoding
    tokens = sum(e.tokens for e in shards)
    size = sum(e.bytes for e in shards)
    rows = [("teacher", t.get("name_or_path")), ("teacher revision", t.get("revision")),
            ("architecture", t.get("architecture")), ("parameters", t.get("num_parameters")),
            ("teacher dtype", t.get("dtype")), ("vocab size (logit width)", t.get("vocab_size")),
            ("k", m.k), ("encoding", f"{enc['name']} {fmt.canonical_json(enc.get('params', {}))[:200]}"),
            ("seq_len", d["seq_len"]), ("windows", f"{sum(e.rows for e in shards)} of {d['num_windows']}"),
            ("tokens", tokens), ("shards", f"{len(shards)} of {m.num_shards}"),
            ("rows per shard", m.rows_per_shard), ("bytes", size),
            ("bytes per token", f"{size / tokens:.1f}" if tokens else "-"), ("complete", m.complete),
            ("data source", d.get("source")), ("data fingerprint", d.get("fingerprint")),
            ("tokenizer fingerprint", m.tokenizer.fingerprint),
            ("producer", m.producer.backend), ("cache key", m.key)]
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    plain = enc["name"] in ("fp16", "fp32")
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n"
            "Next-token distributions of one teacher over a tokenized corpus, as written by "
            "[logitcache](https://pypi.org/project/logitcache/): per position the top-k token ids, "
            "their log-probabilities and the exact log-mass outside them. `manifest.json` describes "
            "the cache completely (with every shard's sha256); this card restates it.\n\n"
            f"| field | value |\n|---|---|\n{table}\n\n## Use\n\n```bash\n"
            "logitcache pull <this repo's hf:// URL> my-cache   # verified download\n```\n\n"
            "```python\nfrom logitcache import CacheReader\n"
            "reader = CacheReader.open(\"<this repo's hf:// URL>\")   # streams with read-ahead\n"
            "import datasets\nds = datasets.load_dataset(\"<this repo>\", split=\"train\")\n```\n\n"
            + ("The top-k columns are plain lists (`seq_len * k` per row, position-major).\n" if plain else
               f"The `{enc['name']}` top-k columns are coded: decode them with `logitcache` "
               "(`CacheReader`); `input_ids` and `target_logprob` are plain lists.\n"))
