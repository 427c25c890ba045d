"""Structured pruning of a checkpoint into a smaller student (Minitron / MiniMA style).

    trainer prune --model runs/teacher --out runs/student --target-params 3M --calib shakespeare:train

Supported architectures: LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM (multi-head or
grouped-query attention, tied or untied embeddings); anything else is refused.

Hidden channels, attention heads (whole KV groups or evenly inside groups) and FFN neurons are
ranked by importance on --calib-windows windows of --calib data (`activation`: mean activation
magnitudes, forward only; `gradient`: first-order loss change of masking each unit), optionally
after dropping the --drop-layers least important decoder layers. The width is chosen to land
within 2% of --target-params (or to remove --sparsity of all parameters). OUT is an ordinary
Hugging Face checkpoint (config, safetensors weights, tokenizer) plus pruning.json.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from logitcache.errors import UserError

# The architectures trainer.prune.SUPPORTED_ARCHITECTURES accepts (a test keeps them equal);
# spelled out here so that `trainer --help` does not import torch.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """'3500000', '3.5M', '350k', '1.2B', '5e6' -> an integer parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbg]?)\s*", text.lower())
    if not m:
        raise UserError(f"--target-params {text}: expected a count such as 3500000, 3.5M or 350k")
    return round(float(m.group(1)) * _SUFFIX[m.group(2)])


def resolve_model(spec: str) -> Path:
    """A local checkpoint folder, or a hub model id downloaded once (where the network allows)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {spec}: not a model folder (no config.json)")
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"--model {spec}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as exc:  # noqa: BLE001  (offline, unknown id, gated: all mean "cannot fetch")
        raise UserError(f"--model {spec}: not a local folder and not fetchable from the hub "
                        f"({type(exc).__name__})") from None


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder to prune (Llama, Qwen2 or Mistral)")
    p.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-params", help="total parameters to keep, e.g. 3.5M (within 2%%)")
    size.add_argument("--sparsity", type=float, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--calib", required=True, help="calibration corpus (any --data source)")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch (default %(default)s)")
    p.add_argument("--method", choices=("activation", "gradient"), default="activation",
                   help="importance estimator (default %(default)s)")
    p.add_argument("--drop-layers", type=int, default=None,
                   help="drop this many whole decoder layers (lowest 1 - cos first) before width pruning")
    p.add_argument("--work", default="work_dir", help="folder for packed windows (default %(default)s)")
    p.add_argument("--text-column", default="text", help="text column of jsonl/parquet data")
    p.epilog = "supported architectures: " + ", ".join(SUPPORTED)


def run(args) -> int:
    import torch

    from logitcache.data import prepare_windows
    from trainer.data import load_tokenizer
    from trainer.prune import prune_to_dir

    model_dir = resolve_model(args.model)
    target = parse_count(args.target_params) if args.target_params is not None else None
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity {args.sparsity}: must be in [0, 1)")
    if args.calib_windows < 1 or args.batch_size < 1:
        raise UserError("--calib-windows and --batch-size must be >= 1")
    tokenizer = load_tokenizer(model_dir, "--model")
    windows = prepare_windows(args.calib, tokenizer, args.seq_len, Path(args.work),
                              text_column=args.text_column)
    tokens = windows.tokens[:args.calib_windows]
    if len(tokens) < args.calib_windows:
        print(f"trainer: warning: --calib {args.calib} has only {len(tokens)} windows of {args.seq_len} tokens",
              file=sys.stderr)
    batches = [torch.as_tensor(tokens[i:i + args.batch_size, :-1], dtype=torch.long)
               for i in range(0, len(tokens), args.batch_size)]
    try:
        summary = prune_to_dir(model_dir, args.out, batches, target_params=target, sparsity=args.sparsity,
                               method=args.method, layers_to_drop=args.drop_layers)
    except ValueError as exc:  # unsupported architecture, unreachable target, bad layer count
        raise UserError(f"--model {args.model}: {exc}") from None
    except Exception as exc:   # a config class refusing the pruned shape (transformers' strict configs)
        if type(exc).__name__.startswith("StrictDataclass"):
            cause = exc.__cause__ or exc
            raise UserError(f"--model {args.model}: the pruned shape is invalid for this architecture "
                            f"({str(cause).strip().splitlines()[-1]}); try another target") from None
        raise
    before, after = summary["params_before"], summary["params_after"]
    print(f"trainer: pruned {before:,} -> {after:,} parameters ({after / before:.1%}); dims "
          f"{json.dumps(summary['dims_after'])} -> {args.out}", file=sys.stderr)
    print(json.dumps(summary))
    return 0
