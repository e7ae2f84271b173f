"""Fig. 4a of the paper: BCE, Focal and ASL in place of MFM inside COMIC.

Every arm is MFM's own formula (comic/losses/mfm.py, `focal_sum`) with other constants, so the four arms differ only
in the loss and `tests/test_ablation.py` checks each against its textbook formula:
  BCE    mfm.use_ht=false mfm.gamma_pos=0 mfm.gamma_neg=0 mfm.clip=0       -[y log p + (1-y) log(1-p)], summed
  Focal  mfm.use_ht=false mfm.gamma_pos=2 mfm.gamma_neg=2 mfm.clip=0       Lin et al. with gamma 2 (no alpha)
  ASL    mfm.use_ht=false mfm.gamma_pos=0 mfm.gamma_neg=4 mfm.clip=0.05    Ridnik et al.: gamma- 4, margin 0.05
  MFM    the default (gamma_pos 0, gamma_neg 3 + gamma_ht, class weight w_c, clip 0.05)
use_ht=false removes the head-tail factor and class weight, leaving the P-N exponents and clip as given. The loss
replaces L of Eq. 1 in all three models and in HTB's kappa. RLC's loss on the corrected labels takes the same
exponents and clip (it reads mfm.gamma_pos / gamma_neg / clip) but keeps its own dynamic class weight w'_c, so
each arm is that loss family throughout COMIC. (Table 2's -MFM arm, `mfm.enabled=false`, swaps L for BCE only.)
Columns, all at the epoch with the best validation mAP: total mAP and average mAP (mean of many / medium / few).

Examples:
  python ablations/losses.py                                       # synthetic benchmark, seeds 0 1 2, CPU
  python ablations/losses.py --preset plt-coco --data ~/data/coco --backend ray --gpus-per-trial 1
  python ablations/losses.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.figures import bars_figure
from comic.studies.spec import AblationSpec, PaperTable

COLUMNS = {"total mAP": "best/test/map", "average mAP": "best/test/map_avg"}
NO_HT = {"mfm.use_ht": False}

SPEC = AblationSpec(
    name="losses",
    title="Fig. 4a: BCE / Focal / ASL / MFM inside COMIC",
    arm_label="loss",
    variants={
        "BCE": {**NO_HT, "mfm.gamma_pos": 0.0, "mfm.gamma_neg": 0.0, "mfm.clip": 0.0},
        "Focal": {**NO_HT, "mfm.gamma_pos": 2.0, "mfm.gamma_neg": 2.0, "mfm.clip": 0.0},
        "ASL": {**NO_HT, "mfm.gamma_pos": 0.0, "mfm.gamma_neg": 4.0, "mfm.clip": 0.05},
        "MFM": {},
    },
    reference="MFM",
    columns=COLUMNS,
    figure=bars_figure("Fig. 4a: losses inside COMIC", tuple(COLUMNS)),
    paper=PaperTable(
        source="Fig. 4a, PLT-COCO, ResNet-50 (bars; the paper prints numbers only for MFM)",
        columns=tuple(COLUMNS),
        rows={
            "BCE": ("below MFM (bar only)", "below MFM (bar only)"),
            "Focal": ("below MFM (bar only)", "below MFM (bar only)"),
            "ASL": ("below MFM (bar only)", "below MFM (bar only)"),
            "MFM": ("55.08 ± 0.14", "54.88 ± 0.19"),
        },
        note="MFM = the full COMIC row of Table 2. Table 1's BCE / Focal / ASL rows are standalone baselines, not "
             "these arms.",
    ),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
