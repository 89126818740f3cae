"""The `mtp-ext` command.

    mtp-ext eval --model smollm2-135m --data austen --steps 2 --top-p 0.99 --tokens 4096
    mtp-ext analyze --model smollm2-135m --data austen --tokens 4096 --out results/smollm2-austen
    mtp-ext report results/* --out results
    mtp-ext generate --model smollm2-135m --prompt "It is a truth" --drafter marginal --max-new-tokens 64 --compare
    mtp-ext train-heads --model smollm2-135m --data austen --heads 3 --whs --steps 200 --out runs/whs
    mtp-ext eval-heads --model smollm2-135m --data austen --heads-dir runs/frozen runs/whs --json heads.json
    mtp-ext train-token-head --model smollm2-135m --data austen --out runs/token-head

Every user error (a bad argument, a missing or damaged file) ends the command with one line on
stderr, `error: ...`, naming what is wrong, and exit status 2 (argparse's own errors: its usage
line and error, also 2). Arguments and output paths are checked before a model is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mtp_ext._io import UserError, atomic_write_text, read_json, required_keys

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "austen"
EXIT_USER_ERROR = 2
EVAL_KEYS = ("model", "data", "task", "steps")
EVAL_STEP_KEYS = ("step", "positions", "accuracy", "accuracy_lower", "accuracy_upper", "captured_mass")
ANALYSIS_KEYS = ("model", "data", "summary")
ANALYSIS_SUMMARY_KEYS = ("positions", "mean_entropy", "mean_nucleus_size")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def open_share(text: str) -> float:
    """argparse type: a float in (0, 1)."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = _float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _add_model_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, **kwargs)
    parser.add_argument("--allow-download", action="store_true",
                        help="let a --model that is neither built in nor a local directory be downloaded as a "
                             "Hugging Face hub id (also: HF_HUB_OFFLINE=0 in the environment)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp-ext", description="Multi-token prediction for next-token LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("eval", help="teacher-forced top-k accuracy of marginalisation MTP")
    _add_model_argument(evaluate, help="built-in name (smollm2-135m, gemma3-270m), checkpoint directory, or "
                                       "a hub id with --allow-download")
    evaluate.add_argument("--data", default=DEFAULT_DATA,
                          help="built-in corpus (austen, shakespeare, bible-en-es) or a .txt / .jsonl file")
    evaluate.add_argument("--steps", type=positive_int, default=2, help="predict x_{t+1} .. x_{t+steps}")
    evaluate.add_argument("--top-p", type=probability, default=0.99, help="nucleus of every intermediate level")
    evaluate.add_argument("--max-candidates", type=positive_int, default=64, help="cap on each nucleus")
    evaluate.add_argument("--max-nodes", type=positive_int, default=256, help="cap on the nodes of a draft tree")
    evaluate.add_argument("--tokens", type=positive_int, default=4096, help="evaluated positions")
    evaluate.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (open-ended text)")
    evaluate.add_argument("--batch-size", type=positive_int, default=4)
    evaluate.add_argument("--top-k", type=positive_int, nargs="+", default=[1, 5])
    evaluate.add_argument("--json", type=Path, help="write the results as JSON here")
    evaluate.add_argument("--plot", type=Path, help="draw the accuracy per step (Fig. 1 style) here (PNG)")
    evaluate.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")

    analysis = commands.add_parser("analyze", help="logit-lens KL, entropy and nucleus sizes (Figs. 2-4)")
    _add_model_argument(analysis)
    analysis.add_argument("--data", default=DEFAULT_DATA)
    analysis.add_argument("--tokens", type=positive_int, default=4096, help="positions to analyse")
    analysis.add_argument("--seq-len", type=positive_int, default=512)
    analysis.add_argument("--top-p", type=probability, nargs="+", default=[0.99, 0.9])
    analysis.add_argument("--out", type=Path, required=True, help="directory for analysis.json and the plots")
    analysis.add_argument("--threads", type=positive_int, default=None)

    generate = commands.add_parser("generate", help="self-speculative decoding with MTP drafts")
    _add_model_argument(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--drafter", default="marginal",
                          help="marginal, heads:DIR for MTP heads saved in DIR, or token-head:DIR for a TokenHead")
    generate.add_argument("--branching", type=positive_int, nargs="+", default=None,
                          help="candidates per node at each depth (heads; default: 3 on a CPU, 4 3 2 2 on a GPU), or "
                               "under the root (marginal and token head, one count; default: 3 on a CPU, 8 on a GPU)")
    generate.add_argument("--max-nodes", type=positive_int, default=None,
                          help="heads drafter: node budget of a draft tree (default: 4 on a CPU, 16 on a GPU)")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=positive_float, default=1.0)
    generate.add_argument("--top-p", type=probability, default=1.0)
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    generate.add_argument("--compare", action="store_true",
                          help="also run model.generate with the same settings and print the speed-up")
    generate.add_argument("--threads", type=positive_int, default=None)

    report = commands.add_parser("report", help="one table and the Fig. 1 chart from eval / analyze results")
    report.add_argument("dirs", type=Path, nargs="+", help="directories holding eval.json and/or analysis.json")
    report.add_argument("--out", type=Path, required=True, help="directory for report.md and fig1.png")
    _add_heads_parsers(commands)
    return parser


def _add_heads_parsers(commands) -> None:
    train = commands.add_parser("train-heads", help="train MTP heads on a frozen or jointly trained backbone")
    _add_heads_data_arguments(train)
    train.add_argument("--heads", type=int, default=3, help="number of heads (head j predicts x_{t+j+2})")
    train.add_argument("--head-type", choices=["resblock", "block"], default="resblock")
    train.add_argument("--whs", action="store_true", help="weighted hidden states: each head mixes every layer")
    train.add_argument("--joint", action="store_true", help="train the backbone too (loss adds the NTP loss)")
    train.add_argument("--steps", type=non_negative_int, required=True,
                       help="train up to this step (resumes from --out)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory (resumed if it holds one)")
    train.add_argument("--batch-size", type=positive_int, default=2, help="windows of --seq-len tokens per step")
    train.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of the heads and WHS weights")
    train.add_argument("--whs-lr", type=positive_float, default=5e-2, help="learning rate of the WHS logits (--whs)")
    train.add_argument("--backbone-lr", type=positive_float, default=1e-5,
                       help="learning rate of the backbone (--joint)")
    train.add_argument("--ntp-weight", type=float, default=1.0, help="weight of the NTP loss (--joint)")
    train.add_argument("--checkpoint-every", type=positive_int, default=25, help="steps between checkpoints")
    train.add_argument("--targets", choices=["text", "model"], default="text",
                       help="what the heads predict: the text, or the backbone's own greedy choices "
                            "(self-distillation, for drafting in speculative decoding)")
    train.add_argument("--init-from", type=Path, default=None,
                       help="start from the heads saved in this directory (fine-tuning); they must match "
                            "--heads, --head-type, --whs and --joint")
    train.add_argument("--time-budget", type=positive_float, default=None,
                       help="stop (and checkpoint) after this many seconds of training; rerun to go on")
    train.add_argument("--eval-tokens", type=positive_int, default=1024,
                       help="held-out positions scored after training")

    token_head = commands.add_parser("train-token-head",
                                     help="train a drafting head that reads the next token too (TokenHead)")
    _add_heads_data_arguments(token_head)
    token_head.add_argument("--out", type=Path, required=True, help="directory for the head")
    token_head.add_argument("--tokens", type=positive_int, default=200_000,
                            help="training positions (one backbone pass)")
    token_head.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out positions scored")
    token_head.add_argument("--epochs", type=positive_int, default=6)
    token_head.add_argument("--batch-size", type=positive_int, default=512, help="positions per step")
    token_head.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW, cosine decay to 0")
    token_head.add_argument("--draft-vocab", type=int, default=8192,
                            help="tokens the head can guess: the model's most frequent choices")

    evaluate = commands.add_parser("eval-heads", help="held-out top-k accuracy of MTP heads beside marginalisation")
    _add_heads_data_arguments(evaluate)
    evaluate.add_argument("--heads-dir", type=Path, nargs="+", required=True, help="train-heads checkpoints")
    evaluate.add_argument("--tokens", type=positive_int, default=1024, help="held-out positions (of step 1)")
    evaluate.add_argument("--marginal-steps", type=positive_int, default=None,
                          help="marginalise up to this step (default: the heads' last step; 1: none)")
    evaluate.add_argument("--top-p", type=probability, default=0.99)
    evaluate.add_argument("--max-candidates", type=positive_int, default=16)
    evaluate.add_argument("--max-nodes", type=positive_int, default=64)
    evaluate.add_argument("--json", type=Path, help="write the results as JSON here")


def _add_heads_data_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_argument(parser)
    parser.add_argument("--data", default=DEFAULT_DATA, help="documents; the last --held-out-share are held out")
    parser.add_argument("--held-out-share", type=open_share, default=0.1)
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window")
    parser.add_argument("--threads", type=positive_int, default=None)


def read_corpus(data: str) -> tuple[str, list]:
    """("translation", the (source, target) pairs) of a parallel corpus, else ("open-ended", the
    documents). Read before any model is loaded, so that a bad file fails at once."""
    from mtp_ext import data as corpora

    if data in corpora.PAIR_CORPORA or corpora.is_pairs_file(data):
        return "translation", corpora.load_pairs(data)
    return "open-ended", corpora.load_text(data)


def sequences_for(data: str, tokenizer, tokens: int, seq_len: int, corpus: tuple[str, list] | None = None):
    """Token sequences of open-ended text, or (prompt, target) pairs for a parallel corpus;
    `corpus`: what read_corpus(data) gave, if it has been read already."""
    from mtp_ext import data as corpora

    task, records = corpus if corpus is not None else read_corpus(data)
    if task == "translation":
        pairs = records
        examples, scored = [], 0
        for example in corpora.translation_examples(tokenizer, pairs, max_examples=None):
            examples.append(example)
            scored += len(example[1])
            if scored >= tokens:
                break
        return examples, "translation"
    return corpora.token_sequences(tokenizer, records, seq_len, max_tokens=tokens), "open-ended"


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.models import describe_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, flag)
    corpus = read_corpus(args.data)
    model, tokenizer = _load_model(args)
    sequences, task = sequences_for(args.data, tokenizer, args.tokens, args.seq_len, corpus)
    if not sequences:
        raise UserError(f"{args.data!r} holds too little text for one sequence of {args.seq_len} tokens")
    result = evaluate_mtp(model, sequences, steps=args.steps, top_k=tuple(args.top_k), top_p=args.top_p,
                          max_candidates=args.max_candidates, max_nodes=args.max_nodes,
                          batch_size=args.batch_size)
    report = {"model": args.model, "weights": describe_weights(model), "data": args.data, "task": task,
              **result.to_dict()}
    print(f"\nmodel {args.model} ({report['weights']}), data {args.data} ({task})\n")
    print(result.table(tuple(args.top_k)))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy([report], args.plot)
        print(f"wrote {args.plot}")
    return report


def run_analyze(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.analysis import analyze
    from mtp_ext.models import describe_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    out = _output_dir(args.out)
    corpus = read_corpus(args.data)
    model, tokenizer = _load_model(args)
    examples, task = sequences_for(args.data, tokenizer, args.tokens, args.seq_len, corpus)
    sequences = [list(e[0]) + list(e[1]) if isinstance(e, tuple) else e for e in examples]
    available = sum(len(sequence) for sequence in sequences)
    if available < args.tokens:
        raise UserError(f"{args.data!r} gave {available} tokens but --tokens asks for {args.tokens}")
    result = analyze(model, sequences, top_ps=tuple(args.top_p))
    report = {"model": args.model, "weights": describe_weights(model), "data": args.data, "task": task,
              **result.to_dict()}
    atomic_write_text(out / "analysis.json", json.dumps(report))
    plot_analysis(report, out)
    summary = result.summary()
    print(f"\nmodel {args.model}, data {args.data}: {summary['positions']} positions, mean entropy "
          f"{summary['mean_entropy']:.3f} nats, mean nucleus sizes "
          + ", ".join(f"top-{p}: {size:.1f}" for p, size in summary["mean_nucleus_size"].items()))
    print("logit-lens KL per layer: " + " ".join(f"{kl:.2f}" for kl in summary["kl_per_layer"]))
    print(f"wrote {out}/analysis.json, logit_lens_kl.png, entropy.png, nucleus_sizes.png")
    return report


def run_generate(args: argparse.Namespace) -> dict:
    import time

    import torch

    from mtp_ext.speculative import resolve_drafter, speculative_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in ("heads", "token-head"):
        if args.drafter.startswith(f"{kind}:") and len(args.drafter) > len(kind) + 1:
            _check_checkpoint_dir(Path(args.drafter[len(kind) + 1:]), kind, "--drafter")
    model, tokenizer = _load_model(args)
    input_ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
    if input_ids.shape[1] == 0:
        raise UserError("--prompt gives no tokens: give some text to continue")
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p)
    tree = {name: value for name, value in (("branching", args.branching), ("max_nodes", args.max_nodes))
            if value is not None}
    drafter = resolve_drafter(args.drafter, model, **tree)
    output = speculative_generate(model, input_ids, drafter=drafter,
                                  generator=torch.Generator().manual_seed(args.seed), **settings)
    stats = output.stats
    print(tokenizer.decode(output.sequences[0]))
    print(f"\n{stats.new_tokens[0]} tokens in {stats.seconds:.2f} s: {stats.tokens_per_second:.2f} tokens/s, "
          f"{stats.verification_steps} verification steps, {stats.mean_accepted_per_step:.2f} tokens per step "
          f"(drafter {args.drafter})")
    report = {"speculative": stats.to_dict()}
    if args.compare:
        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=None) if args.do_sample else {}
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        plain = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, **sampling)
        seconds = time.perf_counter() - start
        plain_rate = (plain.shape[1] - input_ids.shape[1]) / seconds
        print(f"model.generate: {plain_rate:.2f} tokens/s; speed-up {stats.tokens_per_second / plain_rate:.2f}x")
        report["generate"] = {"tokens_per_second": plain_rate}
        if not args.do_sample:
            identical = torch.equal(plain, output.sequences)
            print("outputs identical" if identical else "OUTPUTS DIFFER from model.generate")
            report["generate"]["identical"] = identical
    return report


def plot_analysis(report: dict, out: Path) -> None:
    """Figs. 2-4 of the paper for one model and text."""
    plt = _pyplot()
    label = f"{report['model']} / {report['data']}"
    figure, axes = plt.subplots(figsize=(5, 3.5))
    kl = report["kl_per_layer"]
    axes.plot(range(1, len(kl) + 1), kl, marker="o", markersize=3)
    axes.set(xlabel="layer", ylabel="KL(p_layer || p_final) (nats)", title=f"Logit lens: {label}")
    _save(plt, figure, out / "logit_lens_kl.png")

    figure, axes = plt.subplots(figsize=(7, 3.5))
    first = report["entropy"][0]
    axes.plot(range(len(first)), first, linewidth=0.8)
    axes.set(xlabel="position in the first sequence", ylabel="entropy (nats)",
             title=f"Next-token entropy: {label}")
    _save(plt, figure, out / "entropy.png")

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for p, rows in report["nucleus_sizes"].items():
        values = [value for row in rows for value in row]
        axes.hist(values, bins=50, alpha=0.6, label=f"top-{p}: mean {sum(values) / len(values):.1f}")
    axes.set(xlabel="tokens in the nucleus", ylabel="positions", yscale="log", title=f"Nucleus sizes: {label}")
    axes.legend(fontsize=8)
    _save(plt, figure, out / "nucleus_sizes.png")


def run_report(args: argparse.Namespace) -> str:
    out = _output_dir(args.out)
    evaluations, analyses = [], {}
    for directory in args.dirs:
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory")
        if (directory / "eval.json").is_file():
            evaluations.append(read_eval_json(directory / "eval.json"))
        if (directory / "analysis.json").is_file():
            analysis = read_analysis_json(directory / "analysis.json")
            analyses[(analysis["model"], analysis["data"])] = analysis["summary"]
    if not evaluations and not analyses:
        raise UserError("none of the directories holds eval.json or analysis.json")
    table = report_table(evaluations, analyses)
    atomic_write_text(out / "report.md", table + "\n")
    print(table)
    if evaluations:
        plot_accuracy(evaluations, out / "fig1.png")
    print(f"wrote {out}/report.md" + (", fig1.png" if evaluations else ""))
    return table


def read_eval_json(path: Path) -> dict:
    """An eval.json that `mtp-ext eval --json` wrote; a UserError naming the file and what it
    lacks otherwise."""
    remedy = "write it again with mtp-ext eval --json"
    report = required_keys(read_json(path, "the evaluation", remedy), EVAL_KEYS, path, "the evaluation", remedy)
    if not isinstance(report["steps"], list):
        raise UserError(f"the evaluation {path}: 'steps' is not a list; {remedy}")
    for index, step in enumerate(report["steps"]):
        required_keys(step, EVAL_STEP_KEYS, path, f"step {index + 1} of the evaluation", remedy)
    return report


def read_analysis_json(path: Path) -> dict:
    """An analysis.json that `mtp-ext analyze` wrote; a UserError naming the file and what it
    lacks otherwise."""
    remedy = "write it again with mtp-ext analyze"
    analysis = required_keys(read_json(path, "the analysis", remedy), ANALYSIS_KEYS, path, "the analysis", remedy)
    required_keys(analysis["summary"], ANALYSIS_SUMMARY_KEYS, path, "the summary of the analysis", remedy)
    return analysis


def report_table(evaluations: list[dict], analyses: dict) -> str:
    """One Markdown line per (model, data, step) of every evaluation, with the analysis of the
    same model and data beside it."""
    lines = ["| model | data | task | step | positions | top-1 | top-5 (bounds) | captured mass | "
             "nucleus 0.99 | nucleus 0.9 | entropy |", "|" + "---|" * 11]
    for report in evaluations:
        analysis = analyses.get((report["model"], report["data"]), {})
        sizes = analysis.get("mean_nucleus_size", {})
        for step in report["steps"]:
            accuracy, lower, upper = step["accuracy"], step["accuracy_lower"], step["accuracy_upper"]
            lines.append(
                f"| {report['model']} | {report['data']} | {report['task']} | {step['step']} | {step['positions']} "
                f"| {accuracy.get('top1', float('nan')):.3f} | {accuracy.get('top5', float('nan')):.3f} "
                f"({lower.get('top5', float('nan')):.3f}-{upper.get('top5', float('nan')):.3f}) "
                f"| {step['captured_mass']:.3f} | {_number(sizes.get('0.99'))} | {_number(sizes.get('0.9'))} "
                f"| {_number(analysis.get('mean_entropy'), 3)} |")
    for (model, data), analysis in analyses.items():
        if not any((r["model"], r["data"]) == (model, data) for r in evaluations):
            sizes = analysis["mean_nucleus_size"]
            lines.append(f"| {model} | {data} | - | - | {analysis['positions']} | - | - | - "
                         f"| {_number(sizes.get('0.99'))} | {_number(sizes.get('0.9'))} "
                         f"| {_number(analysis['mean_entropy'], 3)} |")
    return "\n".join(lines)


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _output_dir(path: Path) -> Path:
    """`path`, created if need be, once a file could be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output directory {path}: {error.strerror or error}") from error
    if not _can_create_files_in(path):
        raise UserError(f"the output directory {path} is not writable")
    return path


def check_output_file(path: Path, flag: str) -> None:
    """Raises a UserError unless the output file `path` (given as `flag`) can be written: checked
    before the work, so that a typo does not cost the results."""
    if path.is_dir():
        raise UserError(f"cannot write {flag} {path}: it is a directory; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir() or not _can_create_files_in(directory):
        raise UserError(f"cannot write {flag} {path}: {directory} is not a writable directory")


def _can_create_files_in(directory: Path) -> bool:
    # Tried, not read from the permission bits: root passes those even where nothing can be
    # created (/proc), and the results are written through a temporary file beside the target.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mtp-ext-probe.", suffix=".tmp"):
            return True
    except OSError:
        return False


def plot_accuracy(reports: list[dict], path: Path, k: int = 5) -> None:
    """Bars of top-k accuracy per step for each (model, data) report, with the bounds as error
    bars: the paper's Fig. 1."""
    plt = _pyplot()
    name = f"top{k}"
    steps = sorted({step["step"] for report in reports for step in report["steps"]})
    width = 0.8 / max(len(steps), 1)
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(reports) + 2), 3.5))
    for offset, step_number in enumerate(steps):
        values, lower, upper = [], [], []
        for report in reports:
            step = next((s for s in report["steps"] if s["step"] == step_number), None)
            value = step["accuracy"].get(name, float("nan")) if step else float("nan")
            values.append(value)
            lower.append(value - step["accuracy_lower"].get(name, value) if step else 0)
            upper.append(step["accuracy_upper"].get(name, value) - value if step else 0)
        positions = [index + offset * width for index in range(len(reports))]
        axes.bar(positions, values, width, yerr=[lower, upper], capsize=3, label=f"x(t+{step_number})")
    axes.set_xticks([index + width * (len(steps) - 1) / 2 for index in range(len(reports))])
    axes.set_xticklabels([f"{r['model']}\n{r['data']}" for r in reports], fontsize=8)
    axes.set_ylabel(f"top-{k} accuracy")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    axes.set_title("MTP by marginalisation")
    _save(plt, figure, path)


def _heads_data(args: argparse.Namespace, documents: list[str], tokenizer, training_windows: int,
                held_out_tokens: int):
    """(training windows, held-out sequences of up to `held_out_tokens` positions, the split) of
    `documents` (corpora.load_text of --data)."""
    from mtp_ext import data as corpora
    from mtp_ext.heads.training import split_documents

    train_documents, held_out_documents, split = split_documents(documents, args.held_out_share)
    windows = corpora.token_sequences(tokenizer, train_documents, args.seq_len,
                                      max_tokens=training_windows * (args.seq_len - 1))
    held_out = corpora.token_sequences(tokenizer, held_out_documents, args.seq_len, max_tokens=held_out_tokens)
    if not windows or not held_out:
        raise UserError(f"{args.data!r} holds too little text for windows of {args.seq_len} tokens on both "
                        "sides of the held-out split")
    return windows, held_out, split


def run_train_heads(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.heads import MTPHeadsModel
    from mtp_ext.heads.training import TrainingSettings, evaluate_heads, train_heads
    from mtp_ext.models import describe_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainingSettings(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, whs_lr=args.whs_lr,
                                backbone_lr=args.backbone_lr, ntp_weight=args.ntp_weight,
                                checkpoint_every=args.checkpoint_every, targets=args.targets)
    settings.check()
    if args.init_from is not None:
        _check_checkpoint_dir(args.init_from, "heads", "--init-from")
    documents = _read_documents(args.data)
    out = _output_dir(args.out)
    backbone, tokenizer = _load_model(args)
    windows, held_out, split = _heads_data(args, documents, tokenizer, max(1, args.steps * args.batch_size),
                                           args.eval_tokens)
    if args.init_from is not None:
        heads = _initial_heads(args, backbone)
    else:
        heads = MTPHeadsModel(backbone, args.heads, args.head_type, args.whs, freeze_backbone=not args.joint)
    record = train_heads(heads, windows, settings, out, time_budget_s=args.time_budget)
    accuracies = evaluate_heads(heads, held_out, batch_size=1)
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "settings": vars(settings), "init_from": str(args.init_from) if args.init_from else None,
              "heads": heads.config_dict(), "training": record,
              "held_out": [vars(accuracy) for accuracy in accuracies]}
    atomic_write_text(out / "train.json", json.dumps(report, indent=2))
    print(f"\ntrained to step {record['step']} ({record['tokens_seen']} tokens, {record['seconds']:.0f} s); "
          f"held-out ({split['by']} split):")
    print(heads_table({"heads": accuracies}))
    print(f"wrote {out}")
    return report


def run_train_token_head(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.models import describe_weights
    from mtp_ext.heads.token_head import (TokenHeadSettings, evaluate_token_head, token_head_features,
                                    train_token_head)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TokenHeadSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 draft_vocab=args.draft_vocab)
    documents = _read_documents(args.data)
    out = _output_dir(args.out)
    backbone, tokenizer = _load_model(args)
    settings.check(backbone.get_output_embeddings().weight.shape[0])
    windows, held_out, split = _heads_data(args, documents, tokenizer, max(1, args.tokens // (args.seq_len - 1)),
                                           args.eval_tokens)
    head, record = train_token_head(backbone, token_head_features(backbone, windows), settings)
    accuracy = evaluate_token_head(head, token_head_features(backbone, held_out))
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "seq_len": args.seq_len, "training": record, "held_out": vars(accuracy)}
    head.save(out, report)
    print(f"\ntrained on {record['positions']} positions ({record['seconds']:.0f} s); held-out "
          f"({split['by']} split), the model's own next choice among the head's guesses:")
    print("| positions | top-1 | top-3 |\n|---|---:|---:|")
    print(f"| all {accuracy.positions} | {accuracy.top1:.3f} | {accuracy.top3:.3f} |")
    print(f"| x_(t+1) the model's own choice (greedy decoding) {accuracy.greedy_positions} | "
          f"{accuracy.greedy_top1:.3f} | {accuracy.greedy_top3:.3f} |")
    print(f"draft vocabulary: {settings.draft_vocab} tokens, {accuracy.vocab_coverage:.3f} of the held-out choices")
    print(f"wrote {out}")
    return report


def _initial_heads(args: argparse.Namespace, backbone):
    """The heads saved in --init-from, on `backbone`, if they are the heads the arguments ask for."""
    from mtp_ext.heads import MTPHeadsModel

    heads = MTPHeadsModel.load(args.init_from, backbone)
    saved = (heads.num_heads, heads.head_type, heads.weighted_hidden_states, heads.freeze_backbone)
    asked = (args.heads, args.head_type, args.whs, not args.joint)
    if saved != asked:
        raise ValueError(f"--init-from {args.init_from} holds other heads: (heads, head type, WHS, frozen) = "
                         f"{saved}, the arguments ask for {asked}")
    return heads


def run_eval_heads(args: argparse.Namespace) -> dict:
    import torch

    from mtp_ext.evaluate import evaluate_mtp
    from mtp_ext.heads import load_heads
    from mtp_ext.heads.training import evaluate_heads
    from mtp_ext.models import describe_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json is not None:
        check_output_file(args.json, "--json")
    for directory in args.heads_dir:
        _check_checkpoint_dir(directory, "heads", "--heads-dir")
    documents = _read_documents(args.data)
    backbone, tokenizer = _load_model(args)
    _, held_out, split = _heads_data(args, documents, tokenizer, 1, args.tokens)
    results, configs = {}, {}
    for directory in args.heads_dir:
        # A joint checkpoint overwrites the backbone's weights: each gets a fresh copy.
        heads = load_heads(directory, _load_model(args)[0])
        results[str(directory)] = evaluate_heads(heads, held_out, batch_size=1)
        configs[str(directory)] = heads.config_dict()
    marginal_steps = args.marginal_steps or max(len(accuracies) for accuracies in results.values())
    marginal = evaluate_mtp(backbone, held_out, steps=marginal_steps, top_p=args.top_p,
                            max_candidates=args.max_candidates, max_nodes=args.max_nodes, batch_size=1)
    for name, accuracies in results.items():
        for accuracy, step in zip(accuracies, marginal.steps):
            if accuracy.positions != step["positions"]:
                raise RuntimeError(f"{name}: step {accuracy.step} scored {accuracy.positions} positions, "
                                   f"marginalisation {step['positions']}")
    labels = [directory.resolve().name for directory in args.heads_dir]
    if len(set(labels)) == len(labels):  # short column names where they stay distinct
        table = heads_table(dict(zip(labels, results.values())), marginal.steps)
    else:
        table = heads_table(results, marginal.steps)
    report = {"model": args.model, "weights": describe_weights(backbone), "data": args.data, "split": split,
              "sequences": len(held_out), "seq_len": args.seq_len, "marginalisation": marginal.to_dict(),
              "heads": {name: {"config": configs[name], "steps": [vars(a) for a in accuracies]}
                        for name, accuracies in results.items()}, "table": table}
    print(f"\nmodel {args.model}, data {args.data} (held out: {split['by']} split), top-1 / top-5 per step "
          "(step 1: the backbone's own next-token prediction)\n")
    print(table)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


def heads_table(results: dict, marginal_steps: list[dict] | None = None) -> str:
    """Markdown: one line per step, top-1 / top-5 of marginalisation (with the top-5 bounds) and
    of each set of heads."""
    names = list(results)
    marginal_steps = marginal_steps or []
    head = "| step | positions |" + (" marginalisation top-1 / top-5 (bounds) |" if marginal_steps else "")
    lines = [head + "".join(f" {name} top-1 / top-5 |" for name in names),
             "|" + "---|" * (2 + bool(marginal_steps) + len(names))]
    for row, accuracy in enumerate(results[names[0]]):
        cells = [str(accuracy.step), str(accuracy.positions)]
        if marginal_steps:
            step = marginal_steps[row] if row < len(marginal_steps) else None
            cells.append("-" if step is None else
                         f"{step['accuracy']['top1']:.3f} / {step['accuracy']['top5']:.3f} "
                         f"({step['accuracy_lower']['top5']:.3f}-{step['accuracy_upper']['top5']:.3f})")
        for name in names:
            values = results[name][row].accuracy
            cells.append(f"{values['top1']:.3f} / {values['top5']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load_model(args: argparse.Namespace):
    """(model, tokenizer) of --model; hub ids only with --allow-download (or HF_HUB_OFFLINE=0)."""
    from mtp_ext.models import load_model

    return load_model(args.model, allow_download=True if args.allow_download else None)


def _read_documents(data: str) -> list[str]:
    """The documents of --data, read before any model is loaded, so that a bad file fails at once."""
    from mtp_ext import data as corpora

    return corpora.load_text(data)


def _check_checkpoint_dir(directory: Path, kind: str, flag: str) -> None:
    """A UserError, before any model is loaded, unless `directory` holds the config of a `kind`
    ("heads" or "token-head") checkpoint."""
    from mtp_ext.heads.model import CONFIG_FILE as HEADS_CONFIG
    from mtp_ext.heads.token_head import CONFIG_FILE as TOKEN_HEAD_CONFIG

    config = HEADS_CONFIG if kind == "heads" else TOKEN_HEAD_CONFIG
    what = "MTP heads checkpoint (mtp-ext train-heads)" if kind == "heads" else "token head (mtp-ext train-token-head)"
    if not directory.is_dir():
        raise UserError(f"{flag} {directory} holds no {what}: no such directory")
    if not (directory / config).is_file():
        raise UserError(f"{flag} {directory} holds no {what}: {config} is missing")


COMMANDS = {
    "eval": run_eval,
    "analyze": run_analyze,
    "report": run_report,
    "generate": run_generate,
    "train-heads": run_train_heads,
    "eval-heads": run_eval_heads,
    "train-token-head": run_train_token_head,
}


def main(argv: list[str] | None = None) -> int:
    """Runs one `mtp-ext` command; returns the exit status (2: a user error, said in one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage and error (or the help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    try:
        COMMANDS[args.command](args)
    except (UserError, ValueError, RuntimeError) as error:
        # The project's errors (UserError, and the ValueError / RuntimeError of bad arguments to
        # its functions and ops) name what is wrong; other exceptions are bugs and keep their traceback.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # train-heads has checkpointed by now: rerunning resumes
        print("\ninterrupted" + (f"; the checkpoint in {args.out} resumes on a rerun" if args.command == "train-heads"
                                  else ""), file=sys.stderr)
        return 130
    return 0


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
