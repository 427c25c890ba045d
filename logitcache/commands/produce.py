"""Run one or more teachers over a corpus and write each one's top-k cache.

    logitcache produce --teacher assets/demo-teacher --data shakespeare:train --out work_dir/caches \
        --k 64 --seq-len 256

    # a ladder of teachers sharing one tokenizer: same windows, one cache each
    logitcache produce --teacher gpt2 --teacher gpt2-medium --data corpus.jsonl --out caches --k 64

    # conversations: one row each, top-k stored only where the assistant speaks
    logitcache produce --teacher assets/demo-teacher --data shakespeare-chat:train --out work_dir/caches \
        --chat-template assets/chat_templates/demo.jinja --seq-len 512

    # two processes (say one per GPU) splitting the shards of one cache
    logitcache produce ... --num-workers 2 --worker-index 0 --device cuda:0 &
    logitcache produce ... --num-workers 2 --worker-index 1 --device cuda:1

Each cache lands in OUT/<teacher>-k<k>-<key>/, where the key is a hash of the teacher, tokenizer,
windows, k and encoding: the same command run again finds the same cache, resumes it if it was
interrupted, and writes nothing if it is complete. The caches' folders are printed at the end.

Chat data (rows of `messages`, ShareGPT `conversations`, or `prompt` + `completion`; the embedded
shakespeare-chat:train|heldout; any rows with --format) makes a `sequences` cache instead of
windows: each conversation is rendered with the teacher tokenizer's chat template (or
--chat-template) and is one row, and the teacher's top-k (or draws) are stored only at the
positions whose next token is a training target (--train-on). A conversation longer than
--seq-len + 1 tokens is dropped, cut or split (--truncation). What was read, skipped, dropped or cut,
and the share of positions stored, is reported on stderr. --packing puts several conversations in
one row (each still computed alone; their boundaries are stored and the trainer keeps attention
and positions inside each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitcache.backends import BACKEND_CHOICES
from logitcache.data import FORMATS, TRAIN_ON, TRUNCATIONS
from logitcache.encodings import DEFAULT_ENCODING, available_encodings
from logitcache.errors import UserError
from logitcache.producer.config import ProduceConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", action="append", required=True, metavar="PATH_OR_NAME",
                   help="teacher checkpoint folder or hub model id; repeat for a ladder of teachers")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="corpus: a .txt/.jsonl/.parquet file or folder, a hub dataset name[:split], "
                        "or shakespeare, shakespeare:train, shakespeare:heldout, milton; chat rows (or "
                        "shakespeare-chat:train|heldout) make a cache of conversations")
    p.add_argument("--out", required=True, type=Path, metavar="ROOT",
                   help="folder that holds the caches (and the shared token windows)")
    p.add_argument("--k", type=int, default=None,
                   help="top-k log-probs kept per position (default 64); with --encoding sampled, the draws "
                        "per position S (default 16; the same as --encoding-param S=N)")
    p.add_argument("--seq-len", type=int, default=512, help="positions per window (default 512)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="teacher weights' dtype; auto = as stored in the checkpoint. Log-probs are always "
                        "computed in float32 from the logits")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--rows-per-shard", type=int, default=256,
                   help="windows per Parquet shard (default 256; best a multiple of --batch-size)")
    p.add_argument("--encoding", default=DEFAULT_ENCODING, choices=available_encodings(),
                   help="codec of the top-k columns (default %(default)s: ~0.29x the bytes of fp16 at mean KL "
                        "~9e-4; fp32 and fp16 are exact references; compact, adaptive and sampled: "
                        "docs/encodings.md)")
    p.add_argument("--encoding-param", action="append", default=[], metavar="KEY=VALUE",
                   help="an encoding parameter, repeatable; VALUE is read as JSON if it parses, else as text. "
                        "compact: step (sqrt(p) quantisation step, default 0.009), tail_step (default 1/32); "
                        "adaptive: p (mass kept per position, default 0.95) and compact's; sampled: S (draws per "
                        "position from the full softmax, default 16; hf backend only)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="processes splitting the shards of each cache (default 1)")
    p.add_argument("--worker-index", type=int, default=0,
                   help="this process's index in 0..num_workers-1; it writes shards i with "
                        "i %% num_workers == index")
    p.add_argument("--text-column", default="text", help="column holding the text in jsonl/parquet/hub data")
    p.add_argument("--max-windows", type=int, default=None,
                   help="use only the first N windows of the corpus (of chat data: the first N rows cached)")
    chat = p.add_argument_group("chat data", "conversations: one cache row each, the payload at its loss positions")
    chat.add_argument("--format", default=None, choices=FORMATS,
                      help="chat format of the rows (default: detected from the first row's columns); given, "
                           "the data is read as conversations (text: each row one assistant message)")
    chat.add_argument("--chat-template", default=None, metavar="FILE",
                      help="Jinja chat template rendering the conversations (default: the teacher tokenizer's)")
    chat.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                      help="tokens that carry a loss: every assistant turn (default), the last one, a "
                           "prompt-completion row's completion, or all")
    chat.add_argument("--truncation", default="drop", choices=TRUNCATIONS,
                      help="a conversation longer than --seq-len + 1 tokens: drop it (default, counted), cut "
                           "it to that length (right), or split it into pieces of at most that length")
    chat.add_argument("--packing", action="store_true",
                      help="pack consecutive conversations (or --format text documents) into rows of at most "
                           "--seq-len + 1 tokens, their boundaries recorded: fewer padded positions for the "
                           "student. Each is still computed alone; the trainer restarts positions and keeps "
                           "attention inside each (format 3, docs/FORMAT.md)")
    chat.add_argument("--strict", action="store_true",
                      help="a conversation with no assistant turn to train on is an error (default: skipped "
                           "and counted)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="how to run the teacher: hf (transformers) or vllm (docs/vllm.md); auto picks "
                        "vllm when it is installed and CUDA is present, else hf")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the teachers")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model and tokenizer code from the checkpoint to run (off by default)")
    p.add_argument("--logits-chunk", type=int, default=None,
                   help="positions per LM-head chunk (default: ~256 MB of float32 logits on a GPU, "
                        "~8 MB on a CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vllm: tokens per engine step (chunked prefill); bounds the [tokens, vocab] float32 "
                        "log-prob buffer, e.g. 8192 x 152k x 4 B = 5 GB (default: vLLM's)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per teacher (default 1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: share of GPU memory the engine may take (default 0.9)")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="where the teacher runs: local (this process) or ray (--ray-actors replicas on a Ray "
                        "cluster, each writing shards into the same cache; the result equals a local run's)")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="--engine ray: teacher replicas (default: one per GPU of the cluster with a cuda "
                        "--device, else 1); each takes one GPU, or --ray-cpus-per-actor CPUs")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="--engine ray: cluster to join (auto, ray://host:10001); default: start a local Ray "
                        "for this run. Multi-node needs --out on a file system every node shares")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                   help="--engine ray: CPUs reserved per actor (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def parse_encoding_params(items: list[str]) -> dict:
    """KEY=VALUE strings -> dict; values parsed as JSON when possible, else kept as strings."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--encoding-param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _engine_options(args: argparse.Namespace) -> dict:
    if args.engine == "local":
        if args.ray_actors is not None or args.ray_address is not None:
            raise UserError("--ray-actors/--ray-address: only with --engine ray")
        return {}
    if args.ray_actors is not None and args.ray_actors < 1:
        raise UserError(f"--ray-actors {args.ray_actors}: must be at least 1")
    if args.ray_cpus_per_actor <= 0:
        raise UserError(f"--ray-cpus-per-actor {args.ray_cpus_per_actor}: must be positive")
    return {"actors": args.ray_actors, "address": args.ray_address, "cpus_per_actor": args.ray_cpus_per_actor}


def _k_and_encoding_params(args: argparse.Namespace) -> tuple[int, dict]:
    """--k is the top-k, or a sampled cache's S: then it must agree with --encoding-param S."""
    params = parse_encoding_params(args.encoding_param)
    if args.encoding != "sampled" or args.k is None:
        return (64 if args.k is None else args.k), params
    if "S" in params and params["S"] != args.k:
        raise UserError(f"--k {args.k}: a sampled cache's k is its S, and --encoding-param S={params['S']} differs")
    return args.k, {**params, "S": args.k}


def config_from_args(args: argparse.Namespace) -> ProduceConfig:
    k, encoding_params = _k_and_encoding_params(args)
    backend_options = {"max_num_batched_tokens": args.max_num_batched_tokens,
                       "tensor_parallel_size": args.tensor_parallel_size,
                       "gpu_memory_utilization": args.gpu_memory_utilization}
    return ProduceConfig(
        teachers=tuple(args.teacher), data=args.data, out=args.out, k=k, seq_len=args.seq_len,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
        encoding=args.encoding, encoding_params=encoding_params,
        num_workers=args.num_workers, worker_index=args.worker_index, text_column=args.text_column,
        max_windows=args.max_windows, backend=args.backend, revision=args.revision,
        trust_remote_code=args.trust_remote_code, logits_chunk=args.logits_chunk,
        backend_options={key: v for key, v in backend_options.items() if v is not None},
        engine=args.engine, engine_options=_engine_options(args), progress=not args.no_progress,
        format=args.format, chat_template=args.chat_template, train_on=args.train_on, truncation=args.truncation,
        strict=args.strict, packing=args.packing)


def run(args: argparse.Namespace) -> int:
    from logitcache.producer.pipeline import produce

    for cache_dir in produce(config_from_args(args)):
        print(cache_dir)
    return 0
