"""The ``mergecore`` command line: ``merge`` (a drop-in for mergekit-yaml), ``verify``, ``demo``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from mergecore import __version__
from mergecore.units import human_bytes, positive_int, positive_size, size_arg

# mergekit-yaml switches and options that have no effect here (mergecore streams, applies LoRA
# on the fly and runs no model code), accepted so existing command lines keep working
IGNORED_SWITCHES = ("lazy-unpickle", "low-cpu-memory", "trust-remote-code", "clone-tensors",
                    "read-to-gpu", "async-write", "unsafe-truncate-embeddings")
IGNORED_OPTIONS = ("transformers-cache", "lora-merge-cache", "lora-merge-dtype")
_MERGE_EPILOG = (
    "mergekit-yaml's other options ("
    + ", ".join(f"--{f}" for f in (*IGNORED_SWITCHES, *IGNORED_OPTIONS, "write-threads"))
    + ") are accepted so existing command lines keep working, and have no effect: mergecore "
    "streams, applies LoRA on the fly and runs no model code. --gpu-rich and --multi-gpu "
    "compute on the GPU, as in mergekit (on one GPU: cuda, or --device). "
    "--no-safe-serialization is refused (safetensors only).")


def _add_merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit YAML (one document, or several separated by ---)")
    p.add_argument("out_dir", help="output directory (HF layout, safetensors)")
    p.add_argument("--cuda", action="store_true", help="compute on the GPU (same as --device cuda)")
    p.add_argument("--device", default=None,
                   help="compute device: cpu, cuda, cuda:1 ..., or auto (cuda when there is a "
                        "GPU); wins over --cuda, as in mergekit")
    p.add_argument("--out-shard-size", default="5B", type=size_arg,
                   help="bytes per output shard (default 5B = 5e9, like mergekit; 0: one shard)")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer of the base (or tokenizer_source) model (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True,
                   help="write a README.md model card (default)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false")
    p.add_argument("--allow-crimes", action="store_true",
                   help="allow merging models of different architectures (accepted for mergekit"
                        " compatibility; shapes are still checked)")
    p.add_argument("-j", "--num-threads", type=positive_int, default=None,
                   help="CPU kernel threads (default: all CPUs)")
    p.add_argument("--random-seed", type=int, default=None, help="seed of the DARE random stream")
    p.add_argument("--max-memory", type=positive_size, default=None,
                   help="budget for tensors in flight (default: three of the largest tensor's "
                        "inputs and output, at least 2GiB, at most half the available memory)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace a non-empty output directory")
    existing.add_argument("--resume", action="store_true",
                          help="finish an interrupted merge into OUT_DIR: keep the shards it "
                               "completed (verified against the manifest), merge the rest")
    p.add_argument("--keep-intermediates", default=None, metavar="DIR",
                   help="multi-stage recipes: also write each named stage's model to DIR/<name>")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (tensors, shards, bytes); merge nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="say more (-v: the memory budget, and with --dry-run every tensor's "
                        "inputs and resolved parameters; -vv: debug logging); errors then show "
                        "their traceback")
    # the negative forms of mergekit's switches
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--no-quiet", dest="quiet", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--no-allow-crimes", dest="allow_crimes", action="store_false",
                   help=argparse.SUPPRESS)
    # mergekit's safe_serialization=False writes pickled .bin files; mergecore refuses it
    p.add_argument("--safe-serialization", dest="safe_serialization", action="store_true",
                   default=True, help=argparse.SUPPRESS)
    p.add_argument("--no-safe-serialization", dest="safe_serialization", action="store_false",
                   help=argparse.SUPPRESS)
    for flag in IGNORED_SWITCHES:
        p.add_argument(f"--{flag}", f"--no-{flag}", dest=f"ignored_{flag}", action="store_true",
                       help=argparse.SUPPRESS)
    for flag in ("gpu-rich", "multi-gpu"):  # mergekit's GPU executors: compute on the GPU
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), action="store_true",
                       help=argparse.SUPPRESS)
        p.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_false",
                       help=argparse.SUPPRESS)
    for option in IGNORED_OPTIONS:
        p.add_argument(f"--{option}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-threads", type=int, default=None, help=argparse.SUPPRESS)


BENCH_HELP = "measure roofs, kernels and an end-to-end merge"


def build_parser(*, bench: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``bench=False`` lists ``bench`` without its options: they come
    from the benchmark package, which imports torch (seconds on a cold start), so ``--help``,
    ``--version`` and the other commands' parsing do without it (see :func:`main`)."""
    parser = argparse.ArgumentParser(
        prog="mergecore",
        description="Fast merging of LLM weights; a drop-in for mergekit-yaml.",
    )
    parser.add_argument("--version", action="version", version=f"mergecore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="run a mergekit YAML merge", epilog=_MERGE_EPILOG)
    _add_merge_flags(merge)
    verify = sub.add_parser("verify", help="check a merged output: index, shard headers, "
                            "checksums, config")
    verify.add_argument("out_dir", help="the output directory of a merge")
    verify.add_argument("--no-checksums", dest="checksums", action="store_false",
                        help="skip re-hashing the shards (headers and index are still checked)")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    demo = sub.add_parser("demo", help="generate small example models and merge them")
    demo.add_argument("dir", nargs="?", default=None, help="work directory (default: a temp dir)")
    demo.add_argument("-q", "--quiet", action="store_true")
    if bench:
        from mergecore.benchmark.command import add_parser as add_bench_parser

        add_bench_parser(sub)
    else:
        sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    mergekit_yaml = sub.add_parser(
        "mergekit-yaml", add_help=False,
        help="run mergekit's own CLI with mergecore computing its methods (takes mergekit's flags)")
    mergekit_yaml.add_argument("mergekit_args", nargs=argparse.REMAINDER)
    return parser


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergecore.devices import check_device, resolve_device
    from mergecore.merge import MergeOptions, run_merge

    if not args.safe_serialization:
        raise ValueError("--no-safe-serialization asks for pickled PyTorch .bin files; mergecore "
                         "writes safetensors only (drop the flag)")
    if args.num_threads:
        os.environ["MERGECORE_NUM_THREADS"] = str(args.num_threads)
    device, flag = resolve_device(device=args.device, cuda=args.cuda, gpu_rich=args.gpu_rich,
                                  multi_gpu=args.multi_gpu)
    if flag is not None:
        check_device(device, flag=flag)  # the error names the flag the user typed
    options = MergeOptions(
        device=device,
        out_shard_size=args.out_shard_size,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        allow_crimes=args.allow_crimes,
        num_threads=args.num_threads,
        random_seed=args.random_seed,
        max_memory=args.max_memory,
        overwrite=args.overwrite,
        resume=args.resume,
        quiet=args.quiet,
        dry_run=args.dry_run,
        verbose=args.verbose,
        keep_intermediates=args.keep_intermediates,
    )
    result = run_merge(args.config, args.out_dir, options)
    if not args.quiet and not args.dry_run:
        s = result.stats
        rate = s.bytes_read / s.wall / 1e9 if s.wall else 0.0
        if args.resume and s.tensors == 0:
            print(f"nothing left to merge: {args.out_dir} was complete (its shards verified "
                  "against the manifest; index, config and card written)")
        else:
            print(f"merged {s.tensors} tensors in {s.wall:.2f} s: read "
                  f"{human_bytes(s.bytes_read)}, wrote {human_bytes(s.bytes_written)} "
                  f"({rate:.2f} GB/s input) -> {args.out_dir}")
        if args.verbose:
            print(f"stage busy time: read {s.read_busy:.2f} s, compute {s.compute_busy:.2f} s, "
                  f"write {s.write_busy:.2f} s (wall {s.wall:.2f} s); "
                  f"peak bytes in flight {human_bytes(s.peak_budget_bytes)} of a "
                  f"{human_bytes(s.budget_bytes)} budget")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from mergecore.verify import verify_output

    report = verify_output(args.out_dir, checksums=args.checksums, quiet=args.quiet)
    print(report.text(quiet=args.quiet))
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from mergecore.demo import run_demo

    for module in ("transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"mergecore demo needs {module!r} to generate and load its example "
                             "models: pip install 'mergecore[demo]' (or pip install -e '.[demo]')")
    return run_demo(args.dir, quiet=args.quiet)


def _cmd_bench(args: argparse.Namespace) -> int:
    from mergecore.benchmark.command import cmd_bench

    return cmd_bench(args)


def _cmd_mergekit_yaml(mergekit_args: Sequence[str]) -> int:
    from mergecore.integrations import MissingIntegrationError

    try:
        from mergecore.integrations.mergekit_cli import run_mergekit_yaml
    except MissingIntegrationError as exc:
        print(f"mergecore: error: {exc}", file=sys.stderr)
        return 1
    return run_mergekit_yaml(mergekit_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mergecore`` command (``argv`` defaults to the process's arguments); returns
    the exit status: 0 success, 1 a merge, config or check failure, 2 a usage error (from
    argparse), 128 + N after signal N (130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mergekit-yaml"]:  # every later argument is mergekit's, --help included
        return _cmd_mergekit_yaml(argv[1:])
    try:
        # only `bench` needs its options' parser (it imports torch); the others start fast
        args = build_parser(bench=argv[:1] == ["bench"]).parse_args(argv)
    except KeyboardInterrupt:
        print("mergecore: interrupted before starting; nothing was written", file=sys.stderr)
        return 130
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) > 1 else
        logging.INFO if getattr(args, "verbose", 0) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handlers = {"merge": _cmd_merge, "verify": _cmd_verify, "demo": _cmd_demo,
                "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as exc:
        from mergecore.interrupt import exit_status
        from mergecore.resume import resume_hint

        what = f"interrupted ({exc})" if str(exc) else "interrupted"
        kept = (resume_hint(args.out_dir) if args.command == "merge" else
                "the generated families are kept (--keep)" if getattr(args, "keep", False)
                else "nothing was kept")
        print(f"mergecore: {what}; no output was finalized; {kept}", file=sys.stderr)
        return exit_status(exc)
    except (ValueError, OSError, RuntimeError) as exc:
        if getattr(args, "verbose", 0):
            raise
        print(f"mergecore: error: {exc}", file=sys.stderr)
        if args.command == "merge" and not args.dry_run and isinstance(exc, OSError):
            from mergecore.resume import resume_hint

            print(f"mergecore: {resume_hint(args.out_dir)}", file=sys.stderr)
        return 1
