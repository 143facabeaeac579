"""Command line: ``debora train …`` (also ``python -m debora train …``).

Values come from, in increasing priority: the preset (``--preset``), the config file
(``--config FILE``, YAML or JSON, keys = TrainConfig fields), then the flags given on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# flag -> (TrainConfig field, type, help)
FLAGS = [
    ("--model", "model", str, "hub name or local path (default: the packaged all-MiniLM-L6-v2; "
                              "efficientnet-lite0 for images)"),
    ("--dataset", "dataset", str, "packaged name (rotten-tomatoes, tweets, amazon, nyt, fashion-mnist), "
                                  "local csv/tsv/json/jsonl file, or hub name"),
    ("--dataset-config", "dataset_config", str, "hub dataset config, e.g. sst2 for glue"),
    ("--task", "task", str, "text | image | auto"),
    ("--text-column", "text_column", str, "text column (default: guessed)"),
    ("--text-pair-column", "text_pair_column", str, "second text column for sentence pairs"),
    ("--label-column", "label_column", str, "label column (default: guessed)"),
    ("--train-split", "train_split", str, "hub split to train on (default train)"),
    ("--eval-split", "eval_split", str, "hub split to evaluate on (default: validation if present)"),
    ("--max-examples", "max_examples", int, "cap on training examples (stratified subset)"),
    ("--max-eval-examples", "max_eval_examples", int, "cap on evaluation examples"),
    ("--eval-fraction", "eval_fraction", float, "held-out fraction when the data has no eval split"),
    ("--max-length", "max_length", int, "max tokens per example"),
    ("--image-size", "image_size", int, "image side in px (images)"),
    ("--target-modules", "target_modules", str, "comma-separated module names, or a regex "
                                                "(default: all encoder Linear / all non-grouped Conv2d)"),
    ("--modules-to-save", "modules_to_save", str, "comma-separated modules trained at the lower level "
                                                  "(default: the classifier head)"),
    ("--init-rank", "init_rank", int, "initial rank r0 of every adapter"),
    ("--tau", "tau", float, "rank budget τ"),
    ("--eps", "eps", float, "floor ε of s"),
    ("--budget", "budget", str, "global | per_layer"),
    ("--basis", "basis", str, "euclidean | oblique | stiefel"),
    ("--alpha", "alpha", float, "LoRA-style scale α (update scaled by α/r0)"),
    ("--init-s", "init_s", float, "initial value of every s_i (default 0.1: with s held, each "
                                       "component's magnitude α·s/r0)"),
    ("--init-bases", "init_bases", str, "directions of the initial oblique/Stiefel bases: random "
                                        "(default) | principal (each weight's leading singular vectors, "
                                        "PiSSA's) | minor (its trailing ones, MiLoRA's)"),
    ("--target-rank", "target_rank", float, "final average rank per adapter (the rank budget as a "
                                            "count; cubic schedule from init-rank)"),
    ("--target-params", "target_params", int, "the budget in adapter parameters instead (s and basis "
                                              "columns of every adapter, head not counted; replaces "
                                              "--target-rank; cubic schedule from init-rank)"),
    ("--prune-allocation", "prune_allocation", str, "with --prune-by s: global (smallest s over all "
                                                    "layers) | uniform (equal ranks; s picks within each "
                                                    "layer) | s2_per_param (smallest s² per parameter)"),
    ("--prune-start", "prune_start", float, "fraction of the run where the rank schedule starts"),
    ("--prune-end", "prune_end", float, "fraction of the run where it reaches --target-rank"),
    ("--prune-schedule", "prune_schedule", str, "the budget's path from --prune-start to --prune-end: cubic "
                                                "(default, AdaLoRA's: most removals early) | linear"),
    ("--prune-by", "prune_by", str, "which components the budget removes: svd (default: smallest by "
                                    "--svd-allocation, each cut layer re-factorised) | s (smallest s, "
                                    "the bilevel preset) | random"),
    ("--svd-allocation", "svd_allocation", str, "with --prune-by svd: sigma (smallest σ over all layers) | "
                                                "sigma2_per_param (default: smallest σ² per parameter of a component) | uniform (each "
                                                "layer's σ-tail in turn: equal ranks) | taylor (smallest "
                                                "first-order loss cost of the removal per parameter) | "
                                                "fisher (smallest second-order cost: K-FAC Fisher)"),
    ("--taylor-batches", "taylor_batches", int, "with --svd-allocation taylor/fisher: D1 batches ∂f1/∂W "
                                                "(or the Fisher's factors) is averaged over (default 4)"),
    ("--taylor-refresh", "taylor_refresh", float, "with --svd-allocation taylor/fisher: it is recomputed "
                                                  "after this fraction of the run (default 0.05)"),
    ("--refold-magnitudes", "refold_magnitudes", str, "with --prune-by svd, s held and oblique/Stiefel "
                                                      "bases: the survivors of a cut get s = init-s back "
                                                      "(init_s) or share their layer's initial Σs "
                                                      "(layer_total), the difference folded into the base "
                                                      "weight (the model is unchanged); off; auto (default: layer_total "
                                                      "where it applies, else off)"),
    ("--split", "split", str, "halves (D1, D2 equal random halves) | same (D1 = D2)"),
    ("--estimator", "estimator", str, "hypergradient estimator (bilevel.estimators.available())"),
    ("--estimator-options", "estimator_options", json.loads, "JSON dict of estimator options"),
    ("--inner-steps", "inner_steps", int, "T_max: lower-level steps per outer iteration"),
    ("--fw", "fw", str, "away | vanilla | pairwise"),
    ("--fw-step", "fw_step", str, "short | armijo | open-loop | constant"),
    ("--fw-lipschitz", "fw_lipschitz", float, "M of the short step"),
    ("--fw-step-size", "fw_step_size", float, "step of --fw-step constant; 0 (default) holds s at --init-s "
                                                "(no Frank-Wolfe step; --preset bilevel: 0.05)"),
    ("--fw-step-schedule", "fw_step_schedule", str, "constant | lr: the constant FW step as is, or scaled "
                                                    "by the lower lr's schedule factor"),
    ("--fw-grad-averaging", "fw_grad_averaging", float, "ρ in (0, 1]: Frank-Wolfe steps on the average "
                                                        "d = (1-ρ) d + ρ ∂_s f (stochastic FW, Mokhtari et "
                                                        "al. 2020); 1 (default) = no averaging"),
    ("--gap-tol", "gap_tol", float, "p̃: stop updating s once the FW gap is below it"),
    ("--gap-patience", "gap_patience", int, "consecutive FW gaps <= p̃ before s is frozen"),
    ("--truncate-from", "truncate_from", lambda v: int(v) if float(v).is_integer() else float(v),
     "n0: first outer iteration with truncation, or a fraction of the run in (0, 1) (<0: never)"),
    ("--lr", "lr", float, "lower-level AdamW learning rate"),
    ("--head-lr", "head_lr", float, "learning rate of the head (default: --lr)"),
    ("--weight-decay", "weight_decay", float, "lower-level AdamW weight decay"),
    ("--lr-schedule", "lr_schedule", str, "linear (default) | cosine | constant: the lr decays to 0 "
                                          "over the run's lower steps (constant: no decay)"),
    ("--warmup", "warmup", float, "linear lr warm-up over this fraction of the lower steps (default 0)"),
    ("--epochs", "epochs", float, "passes of the lower level over D2"),
    ("--max-iterations", "max_iterations", int, "cap on outer iterations"),
    ("--batch-size", "batch_size", int, "mini-batch size (D1 and D2) per process; under torchrun the "
                                        "global batch is nproc × batch-size"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation batch size"),
    ("--grad-accum", "grad_accum", int, "gradient accumulation (micro-batches per step)"),
    ("--eval-every", "eval_every", int, "evaluate every k outer iterations (0: start and end only)"),
    ("--log-every", "log_every", int, "log metrics every k outer iterations"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every k outer iterations (0: at the end)"),
    ("--max-nonfinite", "max_nonfinite", int, "abort after this many skipped NaN/Inf steps"),
    ("--output-dir", "output_dir", str, "where metrics, summary, plots, adapter and checkpoint go"),
    ("--seed", "seed", int, "random seed"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--threads", "threads", int, "torch CPU threads (default: torch's choice)"),
    ("--bf16", "bf16", str, "auto (on CUDA) | on | off"),
    ("--resume", "resume", str, "checkpoint directory to resume from, or 'auto' (output-dir/checkpoint)"),
]
LIST_FIELDS = ("target_modules", "modules_to_save")

EXAMPLES = """examples:
  # the offline demo: packaged MiniLM on the packaged Rotten Tomatoes snippets
  debora train --preset default --output-dir runs/demo

  # images: packaged EfficientNet-Lite0 on Fashion-MNIST with CP conv adapters (no --preset: oblique-svd)
  debora train --dataset fashion-mnist --image-size 32 --max-examples 2400 --max-eval-examples 2000 \\
      --epochs 3 --target-rank 2 --output-dir runs/fmnist
  # ... at a fixed rank 2 with s held at 1 (no rank selection)
  debora train --preset fixed-oblique --init-rank 2 --dataset fashion-mnist --image-size 32 \\
      --max-examples 2400 --epochs 3 --lr 3e-3 --lr-schedule linear --output-dir runs/fmnist-fixed

  # network + GPU: DeBERTa-v3-base on GLUE with the paper's settings (one task per run)
  debora train --preset paper --model microsoft/deberta-v3-base --dataset glue --dataset-config sst2 \\
      --max-length 128 --batch-size 32 --epochs 3 --output-dir runs/sst2
  (--dataset-config: cola, sst2, mrpc, qqp, mnli, qnli, rte; sentence pairs are detected)

  # your own csv
  debora train --dataset reviews.csv --text-column review --label-column stars --target-rank 2

  # several processes on one machine (DDP; gloo on CPU, nccl on CUDA); global batch 2 x 16
  torchrun --nproc_per_node=2 -m debora train --batch-size 16 --output-dir runs/ddp

  # the paper's algorithm (closed form, D1/D2 halves, global tau, removal at eps only)
  debora train --preset paper --dataset reviews.csv --output-dir runs/paper
"""


def _split_list(value: str):
    if value is None:
        return None
    if any(c in value for c in "*()[]|\\^$+?") and "," not in value:
        return value  # a regex
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="debora", description="dEBORA: bilevel low-rank adaptation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tr = sub.add_parser("train", help="fine-tune a model with dEBORA adapters",
                        description="Fine-tune with dEBORA (paper §4): lower level AdamW on the bases and "
                                    "head, upper level away-step Frank-Wolfe on the rank weights s.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig values")
    tr.add_argument("--preset", help="named preset: default (the field defaults, sized for the offline "
                                      "demo) | paper (the paper's algorithm) | svd-cut (LoRA-style training "
                                      "with s held, one global SVD cut to --target-rank at the end; Linear "
                                      "and 1×1 conv adapters) | fixed-oblique (oblique bases at a fixed "
                                      "--init-rank, s held at 1: no selection) | oblique-svd (images: "
                                      "oblique adapters from rank 8 at s = 1, cut gradually by SVD to "
                                      "the budget; used for image tasks when no preset is given)")
    for flag, dest, typ, help_ in FLAGS:
        tr.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    tr.add_argument("--export-peft", dest="export_peft", action="store_true", default=None,
                    help="also export the adapter as a PEFT LoRA adapter (output-dir/peft)")
    tr.add_argument("--fused-first-order", dest="fused_first_order", action="store_true", default=None,
                    help="with --split same and --estimator first-order: take ∂_s f from the lower "
                         "backward passes (no extra pass per iteration)")
    tr.add_argument("--no-svd-unfold", dest="svd_unfold", action="store_false", default=None,
                    help="with --prune-by svd on oblique/Stiefel bases: cut ΔW with the initial ΔW0 left "
                         "folded in the weight (default: cut ΔW − ΔW0, what training changed)")
    tr.add_argument("--learn-s", dest="learn_s", action="store_true", default=None,
                    help="train s with the bases' AdamW (a learned magnitude per component; needs "
                         "--fw-step-size 0): the budget's SVD cut still chooses the ranks")
    tr.add_argument("--learn-log-s", dest="learn_log_s", action="store_true", default=None,
                    help="with --learn-s: AdamW on log s instead of s (multiplicative steps, s <- "
                         "s*exp(-lr*u), on the scale of each s; no weight decay on s)")
    tr.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                    help="replace the outputs of an earlier run in --output-dir (default: refuse a "
                         "non-empty output directory unless --resume is given)")
    tr.add_argument("--allow-many-classes", dest="allow_many_classes", action="store_true", default=None,
                    help="accept a label column with more distinct values than half the rows (by default "
                         "refused: it looks like an ID or text column)")
    tr.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false", default=None,
                    help="evaluate with BatchNorm's running statistics as training left them (default: "
                         "recompute them on D2 before every evaluation; models without BatchNorm: no effect)")
    tr.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    tr.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                    help="no progress bar")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def config_from_args(args) -> "TrainConfig":
    from .train.config import TrainConfig, load_config_file
    values = load_config_file(args.config) if args.config else {}
    preset = args.preset or values.pop("preset", None)
    values.pop("preset", None)
    for _, dest, _, _ in FLAGS:
        v = getattr(args, dest)
        if v is not None:
            values[dest] = _split_list(v) if dest in LIST_FIELDS else v
    for dest in ("export_peft", "plots", "progress", "fused_first_order", "overwrite", "allow_many_classes",
                 "svd_unfold", "learn_s", "learn_log_s"):
        v = getattr(args, dest)
        if v is not None:
            values[dest] = v
    if preset is None and _is_image_task(values):
        from .train.config import IMAGE_PRESET
        print(f"debora: an image task without --preset: using --preset {IMAGE_PRESET} (the best measured on "
              "images; --preset default for the text default)", file=sys.stderr)
        preset = IMAGE_PRESET
    return TrainConfig.from_preset(preset, **values)


def _is_image_task(values) -> bool:
    """The task that ``values`` resolve to is images (``--task image``, or ``auto`` with a packaged image
    dataset), the rule of :func:`debora.train.data.resolve_task`."""
    from .train.data import IMAGE_DATASETS
    task = values.get("task", "auto")
    return task == "image" or (task == "auto" and values.get("dataset") in IMAGE_DATASETS)


def main(argv: Optional[List[str]] = None) -> int:
    for var in ("TOKENIZERS_PARALLELISM",):
        os.environ.setdefault(var, "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "train":
        parser.print_help()
        return 2 if args.command is None else 1
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        from .train import train
        from .train.distributed import shutdown
        try:
            result = train(cfg)
        finally:
            shutdown()       # the process group of a torchrun launch (no-op for one process)
    except (ValueError, TypeError) as err:
        print(f"debora train: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"debora train: aborted: {err}", file=sys.stderr)
        return 3
    except OSError as err:
        print(f"debora train: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("debora train: interrupted (the last checkpoint, if any, is intact; resume with "
              "--resume auto)", file=sys.stderr)
        return 130
    if result.trainer.dist is not None and not result.trainer.dist.is_main:
        return 0             # rank 0 reports for every process
    print(result.summary["table"])
    print(f"outputs in {result.output_dir}: summary.md, metrics.jsonl, "
          f"{', '.join(os.path.basename(p) for p in result.summary.get('plots', []))}, adapter/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
