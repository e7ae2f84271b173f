"""The COMIC criterion (Eq. 1 per model, with gradient routing) and the plain BCE criterion.

  balanced: lambda_m L(z_b, y) + lambda_c RLC_b(z_b, y) + lambda_b HTB(z_h_hat, z_t_hat, z_b, y)
  head:     lambda_m L(z_h, y) + lambda_c RLC_h(z_h_hat, y)
  tail:     lambda_m L(z_t, y) + lambda_c RLC_t(z_t_hat, y)
L is MFM (BCE under `mfm.enabled=false`); each model has its own RLC (own D_t). The three sums touch disjoint
parameters (attention keys and HTB teachers are detached in the model / HTB), so one backward of their total trains
each model only on its own terms. The released code's extra "irm" term, which leaks gradient across models, is dropped.
"""

from __future__ import annotations

from torch import Tensor, nn

from comic.config import Config
from comic.losses.baselines import BCE, ElementwiseLoss
from comic.losses.htb import HTBLoss
from comic.losses.mfm import MFMLoss
from comic.losses.rlc import RLCLoss

MODELS = {"b": "balanced", "h": "head", "t": "tail"}


class ComicCriterion(nn.Module):
    """criterion(out: ComicOutput, observed [B, C]) -> (total [], parts).

    parts: unweighted terms 'mfm_b', 'rlc_b', 'htb', 'mfm_h', 'rlc_h', 'mfm_t', 'rlc_t' (disabled ones absent),
    'kappa_h', the weighted per-model sums 'balanced', 'head', 'tail', all detached 0-dim; and 'corrected' [B, C],
    the balanced model's RLC targets (= observed when RLC is off).
    """

    def __init__(self, classification: nn.Module, rlc: dict[str, RLCLoss] | None, htb: HTBLoss | None,
                 lambda_m: float = 1.0, lambda_c: float = 0.2, lambda_b: float = 0.5) -> None:
        super().__init__()
        self.classification = classification
        self.rlc = None if rlc is None else nn.ModuleDict(rlc)
        self.htb = htb
        self.lambda_m, self.lambda_c, self.lambda_b = lambda_m, lambda_c, lambda_b

    @classmethod
    def from_config(cls, cfg: Config, class_counts: Tensor, cooccurrence: Tensor | None = None) -> ComicCriterion:
        """class_counts: [C] observed training positives; cooccurrence: [C, C] counts, only for the MFM prior."""
        base = MFMLoss.from_config(cfg.mfm, class_counts, cooccurrence) if cfg.mfm.enabled else BCE()
        rlc = {k: RLCLoss.from_config(cfg.rlc, cfg.mfm, class_counts) for k in MODELS} if cfg.rlc.enabled else None
        htb = HTBLoss(base, cfg.htb.alpha, cfg.htb.variant, cfg.htb.kappa) if cfg.htb.enabled else None
        return cls(base, rlc, htb, cfg.loss.lambda_m, cfg.loss.lambda_c, cfg.loss.lambda_b)

    @property
    def corrects_labels(self) -> bool:
        """Whether 'corrected' can differ from the observed labels (the trainer then logs `rlc/*` metrics)."""
        return self.rlc is not None

    def start_epoch(self, epoch: int) -> None:
        """Before each epoch's first step: every RLC resets its D_t (and running P_c)."""
        for rlc in self.rlc.values() if self.rlc is not None else ():
            rlc.start_epoch(epoch)

    def _own_terms(self, key: str, z: Tensor, z_rlc: Tensor, y: Tensor, parts: dict[str, Tensor]) -> Tensor:
        """One model's lambda_m L(z) + lambda_c RLC(z_rlc); records the terms (and balanced corrections) in parts."""
        cls_loss = self.classification(z, y)
        parts[f"mfm_{key}"] = cls_loss.detach()
        if self.rlc is None:
            return self.lambda_m * cls_loss
        rlc_loss, corrected = self.rlc[key](z_rlc, y)
        parts[f"rlc_{key}"] = rlc_loss.detach()
        if key == "b":
            parts["corrected"] = corrected
        return self.lambda_m * cls_loss + self.lambda_c * rlc_loss

    def model_losses(self, out, observed: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-model losses {'balanced', 'head', 'tail'} (with grad) and the detached parts."""
        y = observed.float()
        parts: dict[str, Tensor] = {}
        outputs = {"b": (out.logits, out.logits), "h": (out.z_h, out.z_h_hat), "t": (out.z_t, out.z_t_hat)}
        losses = {MODELS[k]: self._own_terms(k, z, z_rlc, y, parts) for k, (z, z_rlc) in outputs.items()}
        if self.htb is not None:
            htb, kappa_h = self.htb(out.z_h_hat, out.z_t_hat, out.logits, y)
            losses["balanced"] = losses["balanced"] + self.lambda_b * htb
            parts |= {"htb": htb.detach(), "kappa_h": kappa_h}
        parts.setdefault("corrected", y)
        parts |= {name: loss.detach() for name, loss in losses.items()}
        return losses, parts

    def forward(self, out, observed: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        losses, parts = self.model_losses(out, observed)
        return losses["balanced"] + losses["head"] + losses["tail"], parts


class LossCriterion(nn.Module):
    """A baseline's plain loss as a criterion: criterion(out, observed [B, C]) -> (loss [], parts).

    parts: {name: loss, 'corrected': the targets the loss trained on}; for label-correcting baselines (SPLC,
    Pseudo-Label) those are its corrected targets, so the trainer measures their corrections like RLC's.
    `start_epoch` forwards the trainer's 1-based epoch to the loss, which counts epochs from 0.
    """

    def __init__(self, loss: ElementwiseLoss, name: str = "loss") -> None:
        super().__init__()
        self.loss, self.name = loss, name
        self.corrects_labels = loss.corrects_labels

    def start_epoch(self, epoch: int) -> None:
        self.loss.start_epoch(epoch - 1)

    def forward(self, out, observed: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.loss(out.logits, observed)
        corrected = self.loss.trained_targets(out.logits.detach().float(), observed.float())
        return loss, {self.name: loss.detach(), "corrected": corrected}
