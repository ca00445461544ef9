"""Rollout correction (TRL's vLLM importance sampling) and the engine's sampling distribution, against hand-computed
values (`pipelines.rl.losses.rollout_correction`, `sampler_logprobs`, `policy_loss(rollout_weights=...)`)."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.rl import losses as L

NAN = float("nan")
# Two sequences; the second has one token the engine did not score (NaN) and one padding position.
POLICY = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
ENGINE = torch.tensor([[-1.5, -2.0, -0.2], [-0.5, NAN, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# Per-token log-ratios policy - engine: row 0: 0.5, 0, -0.3 (sum 0.2); row 1: -0.5, 0 (NaN -> 0), padding 0 (sum -0.5)
E = math.exp


def corr(mode, **kw):
    return L.rollout_correction(POLICY, ENGINE, MASK, mode=mode, **kw)


def test_token_truncate_clips_each_token_ratio():
    c = corr("token_truncate", c_max=1.5, c_min=0.7)
    assert c.weights.shape == (2, 3)
    want = [[1.5, 1.0, E(-0.3)], [0.7, 1.0, 1.0]]  # e^0.5 = 1.649 > 1.5; e^-0.5 = 0.607 < 0.7
    assert torch.allclose(c.weights, torch.tensor(want), atol=1e-6)
    assert c.units == 5 and c.outside == 2  # the padding position is no unit
    assert c.ratio_sum == pytest.approx(1.5 + 1.0 + E(-0.3) + 0.7 + 1.0, abs=1e-6)
    assert (c.ratio_min, c.ratio_max) == (pytest.approx(0.7), pytest.approx(1.5))


def test_token_mask_zeroes_tokens_outside_the_bounds():
    c = corr("token_mask", c_max=1.5, c_min=0.7)
    want = [[0.0, 1.0, E(-0.3)], [0.0, 1.0, 1.0]]
    assert torch.allclose(c.weights, torch.tensor(want), atol=1e-6)
    assert c.outside == 2 and c.ratio_min == 0.0 and c.ratio_max == pytest.approx(1.0)


def test_sequence_ratio_is_the_exp_of_the_summed_log_ratios():
    """TRL sums the token log-ratios (the whole sequence's probability ratio), no length normalisation."""
    c = corr("sequence_truncate", c_max=3.0)
    assert c.weights.shape == (2, 1)
    assert torch.allclose(c.weights.squeeze(1), torch.tensor([E(0.2), E(-0.5)]), atol=1e-6)
    assert c.units == 2 and c.outside == 0
    c = corr("sequence_truncate", c_max=1.1, c_min=0.7)
    assert torch.allclose(c.weights.squeeze(1), torch.tensor([1.1, 0.7]), atol=1e-6) and c.outside == 2


def test_sequence_mask_is_the_default_and_masks_whole_sequences():
    c = corr("sequence_mask")  # C_max 3.0, no C_min: nothing outside
    assert torch.allclose(c.weights.squeeze(1), torch.tensor([E(0.2), E(-0.5)]), atol=1e-6) and c.outside == 0
    c = corr("sequence_mask", c_min=0.7)
    assert torch.allclose(c.weights.squeeze(1), torch.tensor([E(0.2), 0.0]), atol=1e-6)
    assert c.outside == 1 and c.ratio_sum == pytest.approx(E(0.2), abs=1e-6) and c.ratio_min == 0.0
    c = corr("sequence_mask", c_max=1.1)
    assert torch.allclose(c.weights.squeeze(1), torch.tensor([0.0, E(-0.5)]), atol=1e-6)


def test_identical_log_probs_give_ratio_one_and_bad_modes_are_refused():
    c = L.rollout_correction(POLICY, POLICY.clone(), MASK, mode="token_mask", c_max=1.0, c_min=1.0)
    assert torch.equal(c.weights, torch.ones(2, 3)) and c.outside == 0
    for bad in ("none", "sequence"):
        with pytest.raises(ValueError, match="rollout correction mode"):
            L.rollout_correction(POLICY, ENGINE, MASK, mode=bad)


def test_weights_scale_the_policy_term_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0], [-0.5, -0.2]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    w = torch.tensor([[0.5], [0.0]])  # sequence weights: the second sequence masked
    out = L.policy_loss(logp, adv, mask, ref_logp=ref, beta=0.1, rollout_weights=w)
    kl = [[E(-0.2) + 0.2 - 1, 0.0], [0.0, E(0.5) - 0.5 - 1]]  # k3 with x = ref - logp
    # one iteration: ratio 1, per token -(A * w) + beta * kl; grpo: mean per sequence, then over sequences
    seq0 = (-(1.0 * 0.5) + 0.1 * kl[0][0] + -(1.0 * 0.5) + 0.1 * kl[0][1]) / 2
    seq1 = (0.0 + 0.1 * kl[1][0] + 0.0 + 0.1 * kl[1][1]) / 2
    assert float(out.loss.detach()) == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    out.loss.backward()
    # d/dlogp of -(A w r) with r = exp(logp - logp.detach()) is -A w; of beta*k3: beta*(1 - exp(ref - logp))
    g = logp.grad
    assert float(g[1, 0]) == pytest.approx(0.1 * (1 - E(0.0)) / 2 / 2, abs=1e-7)
    assert float(g[0, 0]) == pytest.approx((-0.5 + 0.1 * (1 - E(-0.2))) / 2 / 2, abs=1e-7)


# -- the engine's sampling distribution ------------------------------------------------------------------------
LOGITS = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])  # one sequence, one position, vocabulary of 4


def lp(token, **kw):
    return float(L.sampler_logprobs(LOGITS, torch.tensor([[token]]), **kw)[0, 0])


def test_sampler_logprobs_without_processing_are_the_softmax():
    z = E(2) + E(1) + E(0) + E(-1)
    assert lp(1) == pytest.approx(math.log(E(1) / z), abs=1e-6)
    zt = E(4) + E(2) + E(0) + E(-2)  # temperature 0.5: logits * 2
    assert lp(0, temperature=0.5) == pytest.approx(math.log(E(4) / zt), abs=1e-6)
    assert lp(1, temperature=0.0) == pytest.approx(math.log(E(1) / z), abs=1e-6)  # greedy: no temperature (vLLM)


def test_top_p_renormalises_over_vllms_nucleus():
    # probabilities 0.644, 0.237, 0.087, 0.032; ascending cumulative 0.032, 0.119, 0.356, 1: with top_p 0.8 the
    # tokens whose cumulative mass is <= 0.2 (tokens 3 and 2) are dropped; the nucleus is {0, 1}.
    zn = E(2) + E(1)
    assert lp(0, top_p=0.8) == pytest.approx(math.log(E(2) / zn), abs=1e-6)
    assert lp(1, top_p=0.8) == pytest.approx(math.log(E(1) / zn), abs=1e-6)
    # a sampled token outside the trainer's nucleus counts as inside (it was inside the engine's)
    assert lp(2, top_p=0.8) == pytest.approx(math.log(E(0) / (zn + E(0))), abs=1e-6)
    # top_p so small that only the most likely token stays
    assert lp(0, top_p=0.01) == pytest.approx(0.0, abs=1e-6)


def test_logit_bias_applies_before_temperature_and_top_p():
    # token 1 suppressed (-100): probabilities over {0, 2, 3} = e^2, 1, e^-1 (/ 8.757): 0.844, 0.114, 0.042
    z = E(2) + E(0) + E(-1)
    assert lp(2, logit_bias={1: -100.0}) == pytest.approx(math.log(1 / z), abs=1e-6)
    # ascending cumulative 0 (token 1), 0.042 (3), 0.156 (2), 1 (0): top_p 0.9 keeps {0, 2}, top_p 0.8 keeps {0}
    assert lp(0, logit_bias={1: -100.0}, top_p=0.9) == pytest.approx(math.log(E(2) / (E(2) + 1)), abs=1e-6)
    assert lp(0, logit_bias={1: -100.0}, top_p=0.8) == pytest.approx(0.0, abs=1e-6)
    # temperature 2 divides the biased logit too: token 1's logit (1 - 100) / 2
    zt = E(1) + E(-49.5) + E(0) + E(-0.5)
    assert lp(1, logit_bias={1: -100.0}, temperature=2.0) == pytest.approx(-49.5 - math.log(zt), abs=1e-5)


def test_sampler_logprobs_match_the_trainers_at_top_p_one_and_differ_below():
    """The floor the old metric had: with top_p < 1 the unrenormalised log-probs differ by -log(nucleus mass)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 3
    ids = torch.randint(0, 50, (2, 5), generator=g)
    plain = torch.log_softmax(logits / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(L.sampler_logprobs(logits, ids, temperature=0.7), plain, atol=1e-6)
    nucleus = L.sampler_logprobs(logits, ids, temperature=0.7, top_p=0.95)
    assert bool((nucleus >= plain - 1e-6).all()) and float((nucleus - plain).max()) > 1e-3


# -- in the trainer -----------------------------------------------------------------------------------------------
class EngineStandIn:
    """An off-policy rollout engine for the default suite: transformers' sampler, reporting each sampled token's
    log-prob under its sampling distribution (scored with the policy's weights, as an engine with synced weights
    would) plus `shift` -- a known engine/trainer disagreement. Not the real engine (tests/test_vllm_commands.py)."""

    def __new__(cls, model, processor, shift: float):
        from pipelines.generation.hf import HFBackend

        class _Engine(HFBackend):
            def generate(self, prompts, media, sampling):
                from pipelines.rl import rollout as R

                out = super().generate(prompts, media, sampling)
                samples = [R.Sample(index=i, record={}, media=m, prompt=p)
                           for i, (p, m) in enumerate(zip(prompts, media))]
                groups = [R.Group(s, c) for s, c in zip(samples, out)]
                ids, mask = R.pad_completions(groups, self.pad_id)
                with torch.no_grad():
                    inputs = R.policy_inputs(self.processor, samples, sampling.n, ids, mask)
                    _, lp = R.completion_logprobs(self.model, inputs, ids, sampling.temperature,
                                                  sampler={"top_p": sampling.top_p, "logit_bias": self.logit_bias})
                rows = iter(lp.tolist())
                for g in groups:
                    for c in g.ordered:
                        c.logprobs = [x + shift for x in next(rows)[: len(c.token_ids)]]
                return out

        engine = _Engine(model, processor, batch_size=16)
        engine.logit_bias = {t: -100.0 for t in engine.suppress}
        return engine


def _length_reward(completions, **_):
    """Varies inside a group, so advantages (and the policy term) are non-zero on a random model."""
    return [min(1.0, len(c) / 20.0) for c in completions]


def _run_steps(tiny_model_dir, synth_world, tmp_path, shift, steps, *overrides):
    from pipelines import rewards
    from pipelines.config import load_config
    from pipelines.rl.trainer import RLTrainer

    rewards.REWARDS.setdefault("test_len_is", _length_reward)

    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={synth_world['rl']}",
                                 "rl.algo=grpo", "rl.backend=vllm", "rl.num_generations=3", "rl.per_device_prompts=2",
                                 "rl.max_completion_length=8", "rl.temperature=0.7", "rl.top_p=0.95",
                                 "rl.rewards=[format,test_len_is]",
                                 f"run.output_dir={tmp_path}", *overrides])

    class Run:
        id = "test"

        def __getattr__(self, name):
            return lambda *a, **k: None

    tr = RLTrainer(cfg, Run(), tmp_path / "run", backend=object())  # the stand-in needs the policy: set below
    tr.setup()
    tr.backend = EngineStandIn(tr.unwrapped, tr.processor, shift)
    out = []
    for _ in range(steps):
        out.append(tr.train_step())
        tr.step += 1
    return out


def test_trainer_logs_the_correction_every_step_and_reads_one_for_an_engine_in_sync(tiny_model_dir, synth_world,
                                                                                     tmp_path):
    rows = _run_steps(tiny_model_dir, synth_world, tmp_path, 0.0, 2)
    for m in rows:  # the default: sequence_mask, C_max 3
        assert m["rollout/logp_diff_mean"] < 1e-5 and m["rollout/logp_diff_max"] < 1e-4
        for key in ("rollout/is_ratio_mean", "rollout/is_ratio_min", "rollout/is_ratio_max"):
            assert m[key] == pytest.approx(1.0, abs=1e-4), key
        assert m["rollout/is_masked_fraction"] == 0.0 and m["grad_norm"] > 0


def test_trainer_masks_sequences_the_engine_overrates(tiny_model_dir, synth_world, tmp_path):
    """The engine reports every token 1 nat likelier than the policy: each sequence's ratio is e^-len < C_min 0.5, so
    sequence_mask zeroes every policy term (beta 0: the loss is exactly 0, the gradient too; unmasked, the same
    rewards give a non-zero gradient: the test above)."""
    m, = _run_steps(tiny_model_dir, synth_world, tmp_path, 1.0, 1, "rl.rollout_correction_c_min=0.5", "rl.beta=0")
    assert m["rollout/logp_diff_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["rollout/is_masked_fraction"] == 1.0 and m["rollout/is_ratio_max"] == 0.0
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0


def test_trainer_truncates_token_ratios(tiny_model_dir, synth_world, tmp_path):
    """token_truncate: the engine reports every token 0.2 nats less likely: each token's ratio e^0.2 = 1.22 > C_max
    1.1 is clipped to 1.1."""
    m, = _run_steps(tiny_model_dir, synth_world, tmp_path, -0.2, 1, "rl.rollout_correction=token_truncate",
                    "rl.rollout_correction_c_max=1.1")
    assert m["rollout/is_masked_fraction"] == 1.0
    for key in ("rollout/is_ratio_mean", "rollout/is_ratio_min", "rollout/is_ratio_max"):
        assert m[key] == pytest.approx(1.1, abs=1e-6), key


def test_no_correction_logs_no_ratio(tiny_model_dir, synth_world, tmp_path):
    m, = _run_steps(tiny_model_dir, synth_world, tmp_path, 0.3, 1, "rl.rollout_correction=none")
    assert m["rollout/logp_diff_mean"] == pytest.approx(0.3, abs=1e-4)
    assert not any(k.startswith("rollout/is_") for k in m)
