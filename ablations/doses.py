"""How much HTB, and when RLC starts: two one-at-a-time dose-response curves around the paper's defaults. Not a
table of the paper (it fixes λ_b = 0.5 and corrects labels from the first epoch).

  loss.lambda_b     0, 0.1, 0.25 and the default 0.5: the weight of the balanced model's distillation (Eq. 1);
                    0 trains the balanced model on the classification loss alone (its teachers still train)
  rlc.start_epoch   the default 1 and 5: the first epoch in which RLC corrects labels (a warm-up)
The default point is one arm shared by both curves and the reference of the paired differences. The figure draws
total / few mAP against each knob with 95% t confidence intervals over seeds.
Columns, all at the epoch with the best validation mAP: total / many / medium / few test mAP.

Examples:
  python ablations/doses.py --preset voc2007-dev-lt --data ~/data/VOCdevkit --seeds 0 1 2 3 4
  python ablations/doses.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.figures import sensitivity_figure
from comic.studies.spec import SHOT_COLUMNS, AblationSpec

DEFAULT = "default (λ_b=0.5, RLC from epoch 1)"
LAMBDAS = {f"λ_b={v:g}": v for v in (0.0, 0.1, 0.25)}
STARTS = {f"RLC from epoch {e}": e for e in (5,)}

SPEC = AblationSpec(
    name="doses",
    title="Dose-response: HTB weight lambda_b and RLC warm-up (rlc.start_epoch)",
    arm_label="setting",
    variants={
        **{name: {"loss.lambda_b": v} for name, v in LAMBDAS.items()},
        DEFAULT: {},
        **{name: {"rlc.start_epoch": e} for name, e in STARTS.items()},
    },
    reference=DEFAULT,
    columns=SHOT_COLUMNS,
    figure=sensitivity_figure(
        "COMIC vs lambda_b and the RLC start epoch",
        {"λ_b (loss.lambda_b)": {**LAMBDAS, DEFAULT: 0.5}, "RLC start epoch (rlc.start_epoch)": {DEFAULT: 1, **STARTS}},
        ("total", "few"),
    ),
    smoke_variants=("λ_b=0", DEFAULT, "RLC from epoch 5"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
