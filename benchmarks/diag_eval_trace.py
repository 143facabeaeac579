"""Re-run a finished dEBORA run from its ``config.json`` with periodic held-out evaluation, to see when
its accuracy moved (training is deterministic: the re-run ends where the original did).

    .venv/bin/python benchmarks/diag_eval_trace.py RUN_DIR OUT_DIR EVERY ['{"lr_schedule": "linear"}']

RUN_DIR is a run directory (e.g. ``benchmarks/results/runs/<task>-debora-<setting>-<seed>-report-<lr>``),
OUT_DIR the new run's directory (its ``metrics.jsonl`` holds the ``eval`` records), EVERY the evaluation
period in outer iterations; an optional JSON dict overrides config fields.
"""
import json
import sys

from debora.train import TrainConfig, train
from debora.train.resume import ABSENT_MEANS


def main(argv):
    src, out, every = argv[0], argv[1], int(argv[2])
    over = json.loads(argv[3]) if len(argv) > 3 else {}
    with open(src + "/config.json") as fh:
        cfg = json.load(fh)
    cfg = cfg.get("config", cfg)
    cfg = {**ABSENT_MEANS, **cfg}      # a run from before a field existed ran with its old value
    cfg.update(output_dir=out, eval_every=every, overwrite=True, **over)
    fields = TrainConfig.__dataclass_fields__
    res = train(TrainConfig(**{k: v for k, v in cfg.items() if k in fields}))
    print("end:", res.summary["eval_acc_end"], "trainable:", res.summary["trainable_end"])


if __name__ == "__main__":
    main(sys.argv[1:])
