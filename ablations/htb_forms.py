"""Which form of the Head-Tail Balancer earns its place? Full COMIC (HTB as in the paper: `kd` distillation, κ that
weighs the higher-loss teacher more, λ_b = 0.5) against other forms of Eq. 10-11 and against no HTB at all. Not a
table of the paper: the paper leaves these choices open (and the released code never runs HTB).

  COMIC (paper HTB)   the default
  kappa inverse       htb.kappa=inverse: the lower-loss teacher weighs more
  kappa per sample    htb.kappa=per-sample: the paper's rule per image (A per image), as in xERM where it comes from
  head teacher        htb.kappa=head: distil from the head model only
  D through MFM       htb.variant=mfm: the teachers' soft targets through the classification loss, not plain BCE
  lambda_b 0.1        loss.lambda_b=0.1: a fifth of the paper's HTB weight
  -HTB                htb.enabled=false
Columns, all at the epoch with the best validation mAP: total / many / medium / few test mAP.

Examples:
  python ablations/htb_forms.py --preset voc2007-dev-lt --data ~/data/VOCdevkit --seeds 0 1 2 3 4 --backend ray
  python ablations/htb_forms.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.spec import SHOT_COLUMNS, AblationSpec

PAPER = "COMIC (paper HTB)"

SPEC = AblationSpec(
    name="htb_forms",
    title="HTB forms: kappa, the distillation D and lambda_b (Eq. 10-11) against -HTB",
    arm_label="HTB",
    variants={
        PAPER: {},
        "kappa inverse": {"htb.kappa": "inverse"},
        "kappa per sample": {"htb.kappa": "per-sample"},
        "head teacher": {"htb.kappa": "head"},
        "D through MFM": {"htb.variant": "mfm"},
        "lambda_b 0.1": {"loss.lambda_b": 0.1},
        "-HTB": {"htb.enabled": False},
    },
    reference=PAPER,
    also_against="-HTB",  # which form, if any, beats -HTB
    columns=SHOT_COLUMNS,
    smoke_variants=("head teacher", "-HTB"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
