"""Direct Preference Optimisation: the sigmoid DPO loss (Rafailov et al. 2023, TRL's `loss_type="sigmoid"`).

With log-probabilities summed over the reply tokens of the policy (p) and of the reference (r):

    loss = -log sigmoid(beta * ((p_chosen - r_chosen) - (p_rejected - r_rejected)))

The reference is the starting model: its log-probs are computed once before training
(`vlmkit.train.objectives.Dpo.prepare`) and arrive in each batch. Pair data is read and tokenized in
`vlmkit.data.preferences`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.data.processor import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) sum of log p(label) over labelled positions.

    Position t predicts token t+1 (logits[:, :-1] against labels[:, 1:]); -100 labels are skipped. Only
    the labelled rows of the logits are normalised, in float32.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()  # (N_labelled, V)
    token_logps = picked.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)  # (N,)
    rows = keep.nonzero()[:, 0]  # the sequence each labelled position belongs to
    return torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=logits.device).index_add(0, rows, token_logps)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss on (B,) summed log-probabilities; returns (mean loss, metrics).

    Metrics follow TRL: rewards/chosen = mean beta * (p_chosen - r_chosen), rewards/rejected likewise,
    rewards/margins = their difference, rewards/accuracy = share of pairs whose chosen reward is higher.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
    }
    return loss, metrics


def dpo_step_loss(model, batch: dict, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of one pair batch (`vlmkit.data.preferences.collate_pairs`, plus `ref_chosen_logps` and
    `ref_rejected_logps`); returns (loss, metrics): `dpo_loss`'s and the mean policy and reference log-probs.

    The policy runs once on chosen and rejected stacked into one (2B, T) batch."""
    labels = batch["pair_labels"]
    n = labels.shape[0] // 2
    logps = sequence_logps(model(**batch["pair_inputs"]).logits, labels)
    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(logps)
    loss, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
    detached = logps.detach()
    metrics.update({
        "logps/chosen": detached[:n].mean().item(),
        "logps/rejected": detached[n:].mean().item(),
        "ref_logps/chosen": ref[:n].mean().item(),
        "ref_logps/rejected": ref[n:].mean().item(),
    })
    return loss, metrics
