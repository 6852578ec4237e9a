"""Preference losses over per-pair log-ratios, chosen by name from ``LOSSES`` (``sgpo.core.registry``).

Notation: c, r = policy minus reference summed log-prob of the chosen / rejected response; |c|, |r| = their lengths
in tokens (clamped to >= 1, as TRL does). Each loss returns per-pair values; ``preference_loss`` takes the mean.

* ``sigmoid`` (DPO, TRL ``loss_type="sigmoid"``): -log σ(β (c - r)). When to use: the default.
* ``ipo`` (TRL ``loss_type="ipo"``): (c/|c| - r/|r| - 1/(2β))². Length-averaged log-ratios, exactly as TRL 1.16
  does (its comment: normalised per token, confirmed with the IPO authors). When to use: near-deterministic
  preferences, where DPO's margin grows without bound and overfits; it regresses the margin to a target instead.
* ``hinge`` (SLiC, TRL ``loss_type="hinge"``): max(0, 1 - β (c - r)). When to use: a margin loss that stops pushing
  once a pair is separated by 1/β.
* ``norm`` (open-instruct ``dpo_norm``, = TRL ``sigmoid_norm``): -log σ(β (c/|c| - r/|r|)); open-instruct divides
  the policy and reference log-probs by length, the same thing. When to use: length control in iterative DPO,
  where chosen sides drift longer (typically with a much larger β, e.g. 5).

Metrics are TRL's and, for every loss, on the SUMMED log-ratios (rewards/chosen = mean β c, rewards/rejected =
mean β r, rewards/margins = mean β (c - r), rewards/accuracies = mean [c > r]), so they mean the same across losses.
Adding a loss: one function ``fn(r: LogRatios, beta) -> per-pair tensor`` here and one ``LOSSES`` entry in
``sgpo/core/registry.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sgpo.core.registry import LOSSES


@dataclass(frozen=True)
class LogRatios:
    chosen: torch.Tensor  # [n] policy - reference summed log-prob of the chosen response
    rejected: torch.Tensor  # [n] same for the rejected response
    chosen_tokens: torch.Tensor  # [n] float, chosen response length in tokens
    rejected_tokens: torch.Tensor  # [n] float, rejected response length in tokens

    def detached(self) -> "LogRatios":
        return LogRatios(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)

    @staticmethod
    def cat(parts: list["LogRatios"]) -> "LogRatios":
        """The log-ratios of several slices of a batch as one batch."""
        return LogRatios(*(torch.cat([getattr(p, f) for p in parts]) for f in
                           ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-ratios (lengths clamped to >= 1, as TRL's ``mask.sum(dim=1).clamp(min=1.0)``)."""
        return self.chosen / self.chosen_tokens.clamp(min=1.0), self.rejected / self.rejected_tokens.clamp(min=1.0)


def sigmoid(r: LogRatios, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (r.chosen - r.rejected))


def ipo(r: LogRatios, beta: float) -> torch.Tensor:
    chosen, rejected = r.averaged()
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def hinge(r: LogRatios, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * (r.chosen - r.rejected))


def norm(r: LogRatios, beta: float) -> torch.Tensor:
    chosen, rejected = r.averaged()
    return -F.logsigmoid(beta * (chosen - rejected))


def preference_loss(name: str, logratios: LogRatios, beta: float) -> tuple[torch.Tensor, dict]:
    """mean loss over pairs, and metrics {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "rewards/accuracies"} (detached tensors; rewards on the summed log-ratios whatever the loss)."""
    loss = LOSSES.get(name)(logratios, beta).mean()
    chosen_reward = beta * logratios.chosen.detach()
    rejected_reward = beta * logratios.rejected.detach()
    margins = chosen_reward - rejected_reward
    metrics = {"loss": loss.detach(), "rewards/chosen": chosen_reward.mean(),
               "rewards/rejected": rejected_reward.mean(), "rewards/margins": margins.mean(),
               "rewards/accuracies": (margins > 0).float().mean()}
    return loss, metrics
