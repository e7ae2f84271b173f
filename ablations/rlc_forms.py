"""Does the Reflective Label Corrector earn its place, and in which form? Full COMIC (RLC as in the paper: τ = 0.7,
corrections from the first epoch) against a later start, a stricter threshold, RLC's loss term with no corrections
at all, and no RLC. Not a table of the paper (it corrects from the first epoch and has no warm-up).

  COMIC (paper RLC)     the default
  RLC from epoch 10     rlc.start_epoch=10: corrections only once the models have learnt something
  RLC from epoch 20     rlc.start_epoch=20
  no corrections        rlc.start_epoch=1000: RLC's loss term (margin, dynamic weights) on the observed labels only,
                        so a difference to -RLC is the term's, a difference to the default is the corrections'
  tau 0.9               rlc.tau=0.9: only very confident corrections
  -RLC                  rlc.enabled=false
Columns, all at the epoch with the best validation mAP: total / many / medium / few test mAP.

Examples:
  python ablations/rlc_forms.py --preset voc2007-dev-lt --data ~/data/VOCdevkit --seeds 0 1 2 3 4 --backend ray
  python ablations/rlc_forms.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.spec import SHOT_COLUMNS, AblationSpec

PAPER = "COMIC (paper RLC)"

SPEC = AblationSpec(
    name="rlc_forms",
    title="RLC forms: warm-up, threshold and the corrections themselves (Eq. 2-3) against -RLC",
    arm_label="RLC",
    variants={
        PAPER: {},
        "RLC from epoch 10": {"rlc.start_epoch": 10},
        "RLC from epoch 20": {"rlc.start_epoch": 20},
        "no corrections": {"rlc.start_epoch": 1000},
        "tau 0.9": {"rlc.tau": 0.9},
        "-RLC": {"rlc.enabled": False},
    },
    reference=PAPER,
    also_against="-RLC",  # which form, if any, beats -RLC
    columns=SHOT_COLUMNS,
    smoke_variants=("no corrections", "-RLC"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
