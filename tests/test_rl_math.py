"""T-GRPO / GRPO math against hand-computed numbers: temporal bonus, length bonus, advantages, losses."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.rl import advantages as A
from pipelines.rl import losses as L


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# -- temporal bonus ----------------------------------------------------------------------------------------------
def test_temporal_bonus_is_per_group_not_per_batch():
    # group 0: p = 0.5, p~ = 1.0 -> 0.5 < 0.8 -> nothing; group 1: p = 0.5, p~ = 0 -> bonus on the correct ones.
    # (A batch-level mean, Video-R1 #96, would give p = 0.5 >= 0.8 * 0.5 and pay both groups.)
    acc = t([[1, 0, 1, 0], [1, 1, 0, 0]])
    shuf = t([[1, 1], [0, 0]])
    bonus, granted, p, ps = A.temporal_bonus(acc, shuf, torch.tensor([True, True]), mu=0.8, alpha=0.3)
    assert bonus.tolist() == [[0, 0, 0, 0], [0.3, 0.3, 0, 0]]
    assert granted.tolist() == [False, True]
    assert p.tolist() == [0.5, 0.5] and ps.tolist() == [1.0, 0.0]


def test_temporal_bonus_mu_boundary_included():
    # p = 2/5 = 0.4, p~ = 0.5, mu = 0.8: p == mu * p~ -> granted (>=)
    acc = t([[1, 1, 0, 0, 0]])
    bonus, granted, _, _ = A.temporal_bonus(acc, t([[1, 0]]), torch.tensor([True]), mu=0.8, alpha=0.3)
    assert granted.tolist() == [True] and bonus.tolist() == [[0.3, 0.3, 0, 0, 0]]
    # just below the boundary: p = 0.2 < 0.4
    bonus, granted, _, _ = A.temporal_bonus(t([[1, 0, 0, 0, 0]]), t([[1, 0]]), torch.tensor([True]), mu=0.8)
    assert granted.tolist() == [False] and bonus.abs().sum() == 0
    # the paper's rule (mu = 1): p == p~ included, p < p~ not
    _, g_eq, _, _ = A.temporal_bonus(t([[1, 0]]), t([[0, 1]]), torch.tensor([True]), mu=1.0)
    _, g_lt, _, _ = A.temporal_bonus(t([[1, 0, 0, 0]]), t([[0, 1]]), torch.tensor([True]), mu=1.0)
    assert g_eq.tolist() == [True] and g_lt.tolist() == [False]


def test_temporal_bonus_never_for_images():
    acc = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    shuf = t([[float("nan")] * 2, [0, 0]])
    bonus, granted, p, ps = A.temporal_bonus(acc, shuf, torch.tensor([False, True]), mu=0.8, alpha=0.3)
    assert bonus[0].tolist() == [0, 0, 0, 0] and not granted[0]
    assert math.isnan(ps[0].item()) and p[0].item() == 1.0
    assert bonus[1].tolist() == [0.3, 0.3, 0, 0]


def test_temporal_bonus_correct_threshold():
    # partial credit: only accuracy > 0.1 is "correct"; 0.1 itself is not
    acc = t([[0.1, 0.11, 0.05, 1.0]])
    bonus, _, _, _ = A.temporal_bonus(acc, t([[0.0, 0.0]]), torch.tensor([True]), mu=0.8, alpha=0.3, threshold=0.1)
    assert bonus.tolist() == [[0.0, 0.3, 0.0, 0.3]]


def test_temporal_bonus_alpha_and_nothing_correct():
    # condition holds (0 >= 0.8 * 0) but nothing is correct: no bonus, and not counted as granted
    bonus, granted, _, _ = A.temporal_bonus(t([[0, 0]]), t([[0]]), torch.tensor([True]), mu=0.8, alpha=0.2)
    assert bonus.abs().sum() == 0 and granted.tolist() == [False]
    bonus, _, _, _ = A.temporal_bonus(t([[1, 0]]), t([[0]]), torch.tensor([True]), alpha=0.2)
    assert bonus.tolist() == [[0.2, 0.0]]


# -- temporal rules (registry) and where the temporal reward enters (issue 25) ---------------------------------------
def test_video_r1_rule_is_the_temporal_bonus():
    acc, shuf, vid = t([[1, 0, 1, 0], [1, 1, 0, 0]]), t([[1, 1], [0, 0]]), torch.tensor([True, True])
    r = A.temporal_rule("video_r1", acc, shuf, vid, mu=0.8, alpha=0.3, threshold=0.1)
    bonus, granted, p, ps = A.temporal_bonus(acc, shuf, vid, mu=0.8, alpha=0.3)
    assert torch.equal(r.bonus, bonus) and torch.equal(r.fired, granted)
    assert torch.equal(r.p, p) and torch.equal(r.p_shuffled, ps)
    with pytest.raises(ValueError, match="unknown temporal rule"):
        A.temporal_rule("nope", acc, shuf, vid)


def test_answer_agreement():
    # group 0: shuffled say B, B, A, "" -> "B" agrees with 2/4, "A" with 1/4, "b." (normalised to b) with 2/4,
    # "" (no answer) with nothing, "C" with nothing; group 1 has no shuffled answers (an image): 0
    ag = A.answer_agreement([["B", "A", "b.", "", "C"], ["A", "A", "A", "A", "A"]], [["B", "B", "A", ""], []])
    assert ag.tolist() == [[0.5, 0.25, 0.5, 0.0, 0.0], [0.0] * 5]


def test_contrast_rule_hand_computed():
    # group 0 (video, 4 options): ordered answers B B A C with gold B -> acc 1 1 0 0; shuffled B A A A (p~ = 1/4).
    #   agreement: B -> 1/4, A -> 3/4, C -> 0; bonus = 0.3 * (acc - s) = [0.225, 0.225, -0.225, 0]
    # group 1 (video): everything right both ways (an order-free question): acc 1, s 1 -> 0 bonus, not fired
    # group 2 (image): no shuffled completions -> 0, p~ NaN
    acc = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    shuf = t([[1, 0, 0, 0], [1, 1, 1, 1], [float("nan")] * 4])
    ag = A.answer_agreement([["B", "B", "A", "C"], ["red"] * 4, ["1", "2", "1", "2"]],
                            [["B", "A", "A", "A"], ["red"] * 4, []])
    r = A.temporal_rule("contrast", acc, shuf, torch.tensor([True, True, False]), agreement=ag, alpha=0.3)
    assert r.bonus[0].tolist() == pytest.approx([0.225, 0.225, -0.225, 0.0])
    assert r.bonus[1].tolist() == [0.0] * 4 and r.bonus[2].tolist() == [0.0] * 4
    assert r.fired.tolist() == [True, False, False]
    assert r.p.tolist() == [0.5, 1.0, 0.5] and r.p_shuffled[:2].tolist() == [0.25, 1.0]
    assert math.isnan(r.p_shuffled[2].item())
    # without answers: s = p~ for correct completions, 0 for wrong ones -> [0.225, 0.225, 0, 0]
    r2 = A.temporal_rule("contrast", acc[:1], shuf[:1], torch.tensor([True]), alpha=0.3)
    assert r2.bonus.tolist() == [pytest.approx([0.225, 0.225, 0.0, 0.0])]


def test_temporal_term_reward_is_normalised_away_under_group_advantages():
    # binary accuracy + constant format: +0.3 on the correct ones only rescales the group, and the std divides it out
    base = t([[2, 2, 1, 1]])
    bonus = t([[0.3, 0.3, 0, 0]])
    plain = A.compute_advantages(base, "group")
    in_reward = A.temporal_advantages(base, bonus, "reward", "group")
    assert in_reward.tolist() == [pytest.approx(x, abs=1e-3) for x in plain.tolist()]
    moved, total = A.advantage_change(in_reward, plain)
    assert moved / total < 1e-3
    # as a separate term: A(base) + (bonus - mean bonus) = plain + [0.15, 0.15, -0.15, -0.15]
    sep = A.temporal_advantages(base, bonus, "advantage", "group")
    assert sep.tolist() == [pytest.approx([p + d for p, d in zip(plain[0].tolist(), [0.15, 0.15, -0.15, -0.15])])]
    moved, total = A.advantage_change(sep, plain)
    assert moved == pytest.approx(0.6) and total == pytest.approx(plain.abs().sum().item())
    # mean_only: the two places are the same
    r = A.temporal_advantages(base, bonus, "reward", "mean_only")
    a = A.temporal_advantages(base, bonus, "advantage", "mean_only")
    assert r.tolist() == [pytest.approx([0.65, 0.65, -0.65, -0.65])] and torch.allclose(r, a)
    with pytest.raises(ValueError, match="unknown temporal term"):
        A.temporal_advantages(base, bonus, "elsewhere")


# -- length bonus ------------------------------------------------------------------------------------------------
def test_length_bonus():
    acc = t([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]])
    lengths = torch.tensor([[320, 512, 400, 513, 319], [400, 400, 400, 400, 400]])
    b = A.length_bonus(acc, lengths, omega=0.2, min_len=320, max_len=512, threshold=0.1)
    # group 0: four correct; bounds inclusive; wrong one never; group 1: only one correct -> nothing
    assert b.tolist() == [[0.2, 0.2, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_length_bonus_threshold():
    b = A.length_bonus(t([[0.1, 0.5, 0.5]]), torch.tensor([[330, 330, 330]]), omega=0.2, min_len=320, max_len=512)
    assert b.tolist() == [[0.0, 0.2, 0.2]]


# -- advantages --------------------------------------------------------------------------------------------------
def test_group_advantage():
    r = t([[1, 2, 3, 4]])
    std = math.sqrt(((1.5**2 + 0.5**2) * 2) / 3)  # unbiased
    expected = [(x - 2.5) / (std + 1e-4) for x in (1, 2, 3, 4)]
    assert A.compute_advantages(r, "group").squeeze(0).tolist() == pytest.approx(expected, rel=1e-9)
    assert A.compute_advantages(t([[1, 1, 1, 1]]), "group").abs().sum() == 0


def test_mean_only_advantage():
    assert A.compute_advantages(t([[1, 2, 3, 4], [0, 0, 0, 4]]), "mean_only").tolist() == [
        [-1.5, -0.5, 0.5, 1.5], [-1, -1, -1, 3]]


def test_batch_std_advantage():
    r = t([[1, 2, 3, 4], [0, 0, 0, 4]])
    vals = [1, 2, 3, 4, 0, 0, 0, 4]
    m = sum(vals) / 8
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / 7)  # = sqrt(21.5 / 7)
    assert std == pytest.approx(math.sqrt(21.5 / 7))
    expected = [[(x - 2.5) / (std + 1e-4) for x in (1, 2, 3, 4)], [(x - 1) / (std + 1e-4) for x in (0, 0, 0, 4)]]
    got = A.compute_advantages(r, "batch_std")
    for row, exp in zip(got.tolist(), expected):
        assert row == pytest.approx(exp, rel=1e-9)


def test_unknown_advantage():
    with pytest.raises(ValueError):
        A.compute_advantages(t([[1, 2]]), "nope")


# -- losses ------------------------------------------------------------------------------------------------------
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]]
OLD = [[-1.5, -2.0, -0.2], [-0.3, -0.5, -2.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]
# ratio = [[e^.5, 1, e^-.3], [1, e^-.5, 1]]; clip(0.8, 1.2) -> [[1.2, 1, .7408], [1, .8, 1]]
# per-token loss: row 0 (A=1):  -min(r, clip)      = [-1.2, -1, -e^-.3]   (high side clipped at token 0)
#                 row 1 (A=-2): -min(-2r, -2 clip) = [2, 1.6, (masked)]   (low side clipped at token 1)
ROW0 = [-1.2, -1.0, -math.exp(-0.3)]
ROW1 = [2.0, 1.6]


def _loss(loss_type, **kw):
    logp = t(LOGP, torch.float64).requires_grad_(True)
    out = L.policy_loss(logp, t(ADV), t(MASK), old_logp=t(OLD), beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                        loss_type=loss_type, **kw)
    return out, logp


def test_loss_grpo_sequence_mean_then_mean():
    out, logp = _loss("grpo")
    expected = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.clip_ratio.item() == pytest.approx(2 / 5)
    out.loss.backward()
    g = logp.grad
    # clipped tokens get no gradient; the others: d/dlogp of -A*r / (n_tokens_of_seq * n_seqs) = -A*r / (n * 2)
    assert g[0, 0].item() == 0.0 and g[1, 1].item() == 0.0
    assert g[0, 1].item() == pytest.approx(-1.0 / 6)
    assert g[0, 2].item() == pytest.approx(-math.exp(-0.3) / 6)
    assert g[1, 0].item() == pytest.approx(2.0 / 4)
    assert g[1, 2].item() == 0.0  # masked


@pytest.mark.parametrize("name", ["bnpo", "dapo"])
def test_loss_token_level(name):
    out, _ = _loss(name)
    assert out.loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5, rel=1e-9)


def test_loss_dr_grpo():
    out, _ = _loss("dr_grpo", max_completion_length=4)
    assert out.loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / (2 * 4), rel=1e-9)


def test_loss_single_iteration_ratio_is_one():
    logp = t(LOGP).requires_grad_(True)
    out = L.policy_loss(logp, t(ADV), t(MASK), beta=0.0)  # old_logp = logp.detach()
    assert out.loss.item() == pytest.approx((-1.0 + 2.0) / 2)
    assert out.clip_ratio.item() == 0.0
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1 / 6] * 3)
    assert logp.grad[1].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_kl_k3():
    x = -0.5  # ref - logp
    assert L.kl_k3(t([[-1.0]]), t([[-1.5]])).item() == pytest.approx(math.exp(x) - x - 1)
    # clamped at +-10
    assert L.kl_k3(t([[-1.0]]), t([[19.0]])).item() == pytest.approx(math.exp(10) - 11)
    assert L.kl_k3(t([[0.0]]), t([[-30.0]])).item() == pytest.approx(math.exp(-10) + 9)
    assert L.kl_k3(t([[-2.0]]), t([[-2.0]])).item() == 0.0


def test_loss_with_kl():
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    ref = t([[-1.5, -2.0]])
    out = L.policy_loss(logp, t([0.0]), t([[1, 1]]), ref_logp=ref, beta=0.04)
    kl0 = math.exp(-0.5) + 0.5 - 1
    assert out.loss.item() == pytest.approx(0.04 * kl0 / 2)
    assert out.kl.item() == pytest.approx(kl0 / 2)
    # beta = 0: the reference is ignored
    out0 = L.policy_loss(logp, t([0.0]), t([[1, 1]]), ref_logp=ref, beta=0.0)
    assert out0.loss.item() == 0.0 and out0.kl.item() == 0.0


def test_loss_gspo_sequence_ratio():
    out, _ = _loss("grpo", importance_sampling="sequence")
    s0 = math.exp((0.5 + 0.0 - 0.3) / 3)  # 1.0689: inside the clip range
    s1 = math.exp((0.0 - 0.5) / 2)  # 0.7788: masked token ignored; A < 0 and below 0.8 -> clipped term
    row0 = -s0  # every token of the sequence shares the ratio
    row1 = -min(-2 * s1, -2 * 0.8)
    assert out.loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-9)
    assert out.clip_ratio.item() == pytest.approx(2 / 5)  # the two unmasked tokens of row 1


def test_asymmetric_epsilon():
    logp = t([[0.0]])
    old = t([[-math.log(1.25)]])  # ratio 1.25
    out = L.policy_loss(logp, t([1.0]), t([[1]]), old_logp=old, beta=0.0, epsilon_low=0.2, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25)  # within 1 + 0.28: not clipped
    out = L.policy_loss(logp, t([1.0]), t([[1]]), old_logp=old, beta=0.0, epsilon_low=0.2, epsilon_high=0.2)
    assert out.loss.item() == pytest.approx(-1.2)


@pytest.mark.parametrize("name", ["grpo", "bnpo", "dr_grpo"])
def test_chunks_sum_to_the_whole_batch(name):
    logp, old, mask, adv = t(LOGP), t(OLD), t(MASK), t(ADV)
    kw = dict(beta=0.0, loss_type=name, max_completion_length=3)
    whole = L.policy_loss(logp, adv, mask, old_logp=old, **kw).loss
    parts = sum(L.policy_loss(logp[i:i + 1], adv[i:i + 1], mask[i:i + 1], old_logp=old[i:i + 1], num_sequences=2,
                              num_tokens=5, **kw).loss for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_ranks_with_unequal_batches_average_to_the_global_loss(name):
    """Two ranks with different numbers of sequences and tokens (skipped samples, dynamic sampling): each normalises by
    (global count / world size), as the trainer does after its all-reduce, and the rank-average of their gradients
    (what DDP computes) equals the gradient of the whole step's loss on one rank. Per-rank counts would not."""
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0], [-0.7, -0.1, -0.9]], torch.float64)
    old = t([[-1.5, -2.0, -0.2], [-0.3, -0.5, -2.0], [-0.6, -0.3, -0.9]], torch.float64)
    mask, adv = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]]), t([1.0, -2.0, 0.5])
    kw = dict(beta=0.0, loss_type=name, max_completion_length=3)

    def grad(rows, **norm):
        x = logp[rows].clone().requires_grad_(True)
        L.policy_loss(x, adv[rows], mask[rows], old_logp=old[rows], **kw, **norm).loss.backward()
        return x.grad

    whole = grad([0, 1, 2])  # one rank, the whole step
    ranks, world = [[0, 1], [2]], 2  # rank 0: 2 sequences / 5 tokens, rank 1: 1 sequence / 1 token
    n_seq, n_tok = 3.0, float(mask.sum())
    shared = [grad(r, num_sequences=n_seq / world, num_tokens=n_tok / world) for r in ranks]
    assert torch.allclose(torch.cat(shared) / world, whole, rtol=1e-12)
    local = [grad(r) for r in ranks]  # each rank's own counts: the weights differ
    assert not torch.allclose(torch.cat(local) / world, whole, rtol=1e-3)


def test_batch_std_pooled_over_ranks_equals_the_whole_batch():
    """batch_std on two ranks with the std pooled from all-reduced (count, sum, sum of squares) gives the advantages
    of the whole step on one rank; each rank's own std would not."""
    r0, r1 = t([[1, 2, 3, 4], [0, 0, 0, 4]]), t([[0.5, 0.5, 1, 0]])
    whole = A.compute_advantages(torch.cat([r0, r1]), "batch_std")
    std = A.pooled_std(A.reward_moments(r0) + A.reward_moments(r1))
    assert float(std) == pytest.approx(float(torch.cat([r0, r1]).reshape(-1).std()), rel=1e-12)
    pooled = torch.cat([A.compute_advantages(r, "batch_std", batch_std=std) for r in (r0, r1)])
    assert torch.allclose(pooled, whole, rtol=1e-12)
    assert not torch.allclose(torch.cat([A.compute_advantages(r, "batch_std") for r in (r0, r1)]), whole, rtol=1e-3)
    assert float(A.pooled_std(A.reward_moments(t([[3.0]])))) == 0.0  # one reward: std 0
    assert float(A.pooled_std(A.reward_moments(torch.zeros(0, 4)))) == 0.0  # a rank with nothing


def test_new_loss_is_one_decorated_function():
    @L.register_loss("sum_test")
    def _sum(per_token, mask, **_):
        return (per_token * mask).sum()

    try:
        out, _ = _loss("sum_test")
        assert out.loss.item() == pytest.approx(sum(ROW0) + sum(ROW1))
    finally:
        L.AGGREGATIONS.pop("sum_test")
    with pytest.raises(ValueError):
        _loss("nope")


# ---------------------------------------------------------------------------------------------------------------------
# How many steps a run takes (pipelines.rl.schedule: shared by the trainer and the quickstart)
def test_rl_schedule_by_hand():
    from pipelines.rl.schedule import epochs_for, steps_per_epoch, total_steps

    assert steps_per_epoch(4000, 2, 16) == 125           # 2,000 per shard / 16
    assert steps_per_epoch(4001, 2, 16) == 125           # the odd record is dropped (2,000 per shard)
    assert steps_per_epoch(4000, 2, 16, grad_accum=2) == 63  # 2,000 / 32, the short last step counts
    assert steps_per_epoch(10, 1, 4) == 3
    assert total_steps(1000, 1.0, 125) == 125             # the epochs cut max_steps short
    assert total_steps(100, 2.0, 125) == 100
    assert total_steps(1000, 0.5, 125) == 62
    assert total_steps(1000, 0.001, 125) == 1             # at least one step
    assert [epochs_for(s, 125) for s in (1, 125, 126, 250, 251)] == [1, 1, 2, 2, 3]
