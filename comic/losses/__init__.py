"""Losses: COMIC's MFM / RLC / HTB and its criterion, and the baselines' losses (one small class each).

Every criterion is called as `criterion(out, observed [B, C]) -> (total [], parts)` and has `start_epoch(epoch)`
(`comic.methods.Criterion`); a plain loss is called as `loss(logits [B, C], targets [B, C]) -> []`. Class statistics
arrive as tensors in the constructor. Losses never read files.
"""

from comic.losses.baselines import ASL, BCE, Focal, Hill
from comic.losses.baselines_partial import SPLC, PartialASL, PseudoLabel
from comic.losses.baselines_reweight import DB, DBFocal
from comic.losses.criterion import ComicCriterion, LossCriterion
from comic.losses.htb import HTBLoss
from comic.losses.mfm import MFMLoss, focal_sum, head_tail_factor
from comic.losses.rlc import RLCLoss

__all__ = ["ASL", "BCE", "DB", "DBFocal", "SPLC", "ComicCriterion", "Focal", "HTBLoss", "Hill", "LossCriterion",
           "MFMLoss", "PartialASL", "PseudoLabel", "RLCLoss", "focal_sum", "head_tail_factor"]
