"""Table 4 of the paper: the two factors of the Multi-Focal Modifier loss (MFM, Eq. 5-6).

  full MFM            the default: P-N focusing exponents (gamma_pos 0, gamma_neg 3) plus the H-T factor gamma_ht
                      (negative exponent + class weight w_c from the training class distribution)
  P-N only (no H-T)   mfm.use_ht=false: gamma_ht and the class weight w_c off
  H-T only (no P-N)   mfm.use_pn=false: the P-N exponents set to 0, gamma_ht and w_c kept
The switches act on MFM, the classification loss L of Eq. 1 (also used for HTB's kappa); RLC keeps its own loss on
the corrected labels. Exactly how the authors switched the factors off is not stated in the paper.
Columns, all at the epoch with the best validation mAP: total mAP and the many / medium / few group mAPs.

Examples:
  python ablations/mfm_factors.py                                  # synthetic benchmark, seeds 0 1 2, CPU
  python ablations/mfm_factors.py --preset plt-coco --data ~/data/coco --backend ray --gpus-per-trial 1
  python ablations/mfm_factors.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.spec import SHOT_COLUMNS, AblationSpec, PaperTable

COLUMNS = SHOT_COLUMNS

SPEC = AblationSpec(
    name="mfm_factors",
    title="Table 4: MFM factors (P-N and H-T)",
    arm_label="MFM factors",
    variants={
        "H-T only (no P-N)": {"mfm.use_pn": False},
        "P-N only (no H-T)": {"mfm.use_ht": False},
        "full MFM": {},
    },
    reference="full MFM",
    columns=COLUMNS,
    paper=PaperTable(
        source="Table 4, PLT-COCO, ResNet-50 (single numbers; the drop against full MFM in brackets)",
        columns=tuple(COLUMNS),
        rows={
            "H-T only (no P-N)": ("54.44 (↓0.64)", "48.65 (↓0.56)", "60.00 (↓0.08)", "53.81 (↓1.55)"),
            "P-N only (no H-T)": ("53.70 (↓1.38)", "48.38 (↓0.83)", "58.99 (↓1.09)", "52.91 (↓2.45)"),
            "full MFM": ("55.08", "49.21", "60.08", "55.36"),
        },
        note="Row identities follow the paper's text (\"H-T factor: 53.7 -> 55.08, tail +2.45\").",
    ),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
