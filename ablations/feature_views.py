"""How many augmented views per training image does the feature cache need? Profile frozen with K = 1, 2, 4, 8
views (`data.feature_views`; each epoch draws one view per image). Not a table of the paper: it chooses the default
of `data.feature_views` (extraction time grows with K, the augmentation each epoch sees with it too).

Columns, all at the epoch with the best validation mAP: total / many / medium / few test mAP.
The reference is K = 4; run it per method (`method=bce`, `method=comic`).

Examples:
  python ablations/feature_views.py --preset voc2007-dev --data ~/data/VOCdevkit --seeds 0 1 2 method=comic
  python ablations/feature_views.py --smoke-test
"""

from __future__ import annotations

import sys

from comic.studies import cli
from comic.studies.spec import SHOT_COLUMNS, AblationSpec

SPEC = AblationSpec(
    name="feature_views",
    title="Feature cache: K augmented views per training image (profile frozen)",
    arm_label="views",
    variants={f"K={k}": {"model.profile": "frozen", "data.feature_views": k} for k in (1, 2, 4, 8)},
    reference="K=4",
    columns=SHOT_COLUMNS,
    smoke_variants=("K=1", "K=4"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
