"""Which trunk path is faithful? The released profile (one frozen trunk with train-mode BatchNorm, images through it
every epoch, fresh augmentations) against the frozen profile (eval-mode BatchNorm, trunk features cached once,
`data.feature_views` augmented views per training image). Not a table of the paper: the price of the fast path.

  released (images)   model.profile=released
  frozen (cached)     model.profile=frozen
Run it once per method (the positional override `method=bce`, `method=comic`, ...); the paired difference
frozen - released over seeds says whether the cached path may stand in for the released one.
Columns, all at the epoch with the best validation mAP: total / many / medium / few test mAP.

Examples:
  python ablations/trunk_profile.py --preset voc2007-dev --data ~/data/VOCdevkit --seeds 0 1 2 method=comic
  python ablations/trunk_profile.py --smoke-test
Rerunning the same command skips finished cells, resumes interrupted ones and retries failed ones.
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.spec import SHOT_COLUMNS, AblationSpec

RELEASED = "released (images)"

SPEC = AblationSpec(
    name="trunk_profile",
    title="Trunk profile: released (train-mode BatchNorm, images) vs frozen (eval-mode BatchNorm, cached features)",
    arm_label="profile",
    variants={RELEASED: {"model.profile": "released"}, "frozen (cached)": {"model.profile": "frozen"}},
    reference=RELEASED,
    columns=SHOT_COLUMNS,
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
