"""Losses: COMIC's MFM / RLC / HTB and its criterion, plus the plain BCE used by the '-MFM' ablation and baseline.

Every criterion is called as `criterion(out, observed [B, C], state) -> (total [], parts)` and has
`start_epoch(epoch)`; class statistics arrive as tensors in the constructor. Losses never read files.
"""

from comic.losses.criterion import BCECriterion, ComicCriterion, StepState
from comic.losses.htb import HTBLoss
from comic.losses.mfm import BCELoss, MFMLoss, focal_sum, head_tail_factor
from comic.losses.rlc import RLCLoss

__all__ = ["BCECriterion", "BCELoss", "ComicCriterion", "HTBLoss", "MFMLoss", "RLCLoss", "StepState", "focal_sum",
           "head_tail_factor"]
