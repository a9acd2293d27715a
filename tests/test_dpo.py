"""finetune_instruct.dpo_loss (the book's DPO bonus) against the formula worked by hand."""
import math

import pytest
import torch

from finetune_instruct import dpo_loss


def test_dpo_loss_equals_the_hand_computation_and_swapping_flips_its_sign():
    # summed log-probabilities of two responses under the policy and the reference, beta 0.1
    policy_chosen, policy_rejected = torch.tensor([-10.0, -4.0], requires_grad=True), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    # rewards beta * (policy - reference): chosen 0.1 * (1, 0.5), rejected 0.1 * (-0.5, 0.5); margins 0.15 and 0
    # loss = mean of -log sigmoid(margin) = mean of log(1 + e^-margin)
    by_hand = (math.log(1 + math.exp(-0.15)) + math.log(2)) / 2
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.05]) and rejected.tolist() == pytest.approx([-0.05, 0.05])
    # d loss / d policy_chosen = -beta * sigmoid(-margin) / 2: more probability on the chosen side lowers the loss
    loss.backward()
    expected_grad = [-0.1 / (1 + math.exp(0.15)) / 2, -0.1 * 0.5 / 2]
    assert policy_chosen.grad.tolist() == pytest.approx(expected_grad, abs=1e-7)
    # chosen and rejected swapped: each margin changes sign, and log(1 + e^m) - log(1 + e^-m) = m,
    # so the loss grows by exactly the mean margin and the rewards trade places
    swapped, chosen_s, rejected_s = dpo_loss(policy_rejected, policy_chosen.detach(), ref_rejected, ref_chosen, beta=0.1)
    assert swapped.item() == pytest.approx(by_hand + (0.15 + 0.0) / 2, abs=1e-6)
    assert torch.equal(chosen_s, rejected) and torch.equal(rejected_s, chosen)
    # the policy equal to its reference: log 2, whatever the log-probabilities
    assert dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta=0.5)[0].item() == pytest.approx(math.log(2))
