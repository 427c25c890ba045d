"""Two producers on one cache (the same command, the same worker index, started together) split
its shards through per-shard claims: every shard written once, none torn, the cache identical to
one producer's. Claim files, their takeover and staleness are tested directly too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_produce import REPO, cache_bytes, cli_command, cli_env, one_thread, produce  # noqa: F401

from logitcache import format as fmt
from logitcache.producer.claims import ShardClaims, claim_name
from logitcache.verify import verify_cache


@pytest.fixture(scope="module")
def slower_teacher(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A Llama wide enough (hidden 192, 4 layers) that the two producers' work overlaps in time."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("slower") / "llama"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_two_producers_started_together_split_the_work(capsys, tmp_path, slower_teacher, corpus_dir):
    common = ["--teacher", str(slower_teacher), "--data", str(corpus_dir), "--k", "8", "--seq-len", "48",
              "--rows-per-shard", "4", "--batch-size", "4", "--max-windows", "96", "--no-progress"]
    rc, (reference,), _ = produce(capsys, *common, "--out", str(tmp_path / "ref"))
    assert rc == 0
    n = fmt.load_manifest(reference)["num_shards"]
    assert n == 24

    root = tmp_path / "shared"
    procs = [subprocess.Popen(cli_command(*common, "--out", str(root)), env=cli_env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    cache = root / reference.name
    assert [o[0].strip() for o in outs] == [str(cache)] * 2          # both report the finished cache
    # A process that shared the work reports how many shards it wrote; together they wrote every shard
    # once. On a busy machine one process can start only after the other finished (then neither reports,
    # the late one finding the cache complete): what must hold either way is the cache below, and the
    # claims themselves are exclusive (test_claims_exclusive_stale_and_taken_over).
    written = [re.search(r"(\d+) of (\d+) shards written by this process", err) for _, err in outs]
    counts = [int(w.group(1)) for w in written if w]   # a process that wrote all it planned says nothing
    assert sum(counts) == n if len(counts) == 2 else sum(counts) <= n, [o[1] for o in outs]
    assert cache_bytes(cache) == cache_bytes(reference)
    assert verify_cache(cache) == []
    assert not [p for p in os.listdir(cache) if p.startswith(".") and p != fmt.LOCK_NAME]   # no claims, no temporaries


def test_ctrl_c_while_a_claim_is_written_leaves_no_claim(tmp_path, monkeypatch):
    """Ctrl-C can land between creating a claim file and finishing it; close() must still remove it."""
    import logitcache.producer.claims as claims_module

    cache = tmp_path / "c"
    cache.mkdir()
    claims = ShardClaims(cache)

    def interrupted_dump(obj, f):
        f.write('{"host": ')                      # half a claim on disk, then Ctrl-C
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(claims_module.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        claims.try_claim(4)
    monkeypatch.undo()
    assert (cache / claim_name(4)).exists() and 4 in claims.held
    claims.close()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".claim")]


def test_claims_exclusive_stale_and_taken_over(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    a, b = ShardClaims(cache, stale_after=0.6), ShardClaims(cache, stale_after=0.6)
    try:
        assert a.try_claim(3) and a.try_claim(3)                     # idempotent for its holder
        assert not b.try_claim(3)                                    # held, refreshed by a's heartbeat
        time.sleep(1.0)
        assert not b.try_claim(3)
        info = json.loads((cache / claim_name(3)).read_text())
        assert info["pid"] == os.getpid() and set(info) == {"host", "pid", "token", "time"}
        a.release(3)
        assert not (cache / claim_name(3)).exists() and b.try_claim(3)
        b.release(3)

        # a claim of a dead process on this host is taken over at once
        dead = subprocess.Popen(["true"])
        dead.wait()
        (cache / claim_name(5)).write_text(json.dumps({"host": a.host, "pid": dead.pid, "token": "x", "time": 0}))
        assert a.try_claim(5)
        # a silent claim of another host only after stale_after
        (cache / claim_name(6)).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y", "time": 0}))
        assert not a.try_claim(6)
        old = time.time() - 5
        os.utime(cache / claim_name(6), (old, old))
        assert a.try_claim(6)
        # take(): a shard held by another is waited for until it is listed, then skipped
        done: set[int] = set()
        assert b.try_claim(7)
        got = []
        for i in a.take([7, 8], lambda: set(done)):
            got.append(i)
            done.add(i)
            b.release(7, written=True)
            done.add(7)
        assert got == [8] and a.by_others == {7}
    finally:
        a.close()
        b.close()
    assert not [p for p in os.listdir(cache) if p.startswith(".claim-")]
