"""The policy trainer's experience on plain (non-DeepSpeed) tiny models: the greedy baseline is
deterministic and comes from the prompt alone, rewards are read at each answer's first eos, the
action mask keeps exactly the first eos, and advantage = r(sampled) - r(greedy); k samples per
prompt share one baseline; PPO's values and GAE; the ReMax loss and gradients pinned to their values
before the trainer served several algorithms."""
import copy
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from algorithms import ALGORITHMS, AlgorithmSettings
from trainer import PolicyTrainer, RolloutSettings
from utils.data.data_utils import DataCollatorRLHF
from utils.model.model_utils import load_hf_tokenizer
from utils.model.reward_model import RewardModel, answer_end_index

PROMPTS = ["\n\nHuman: Tell me about the moon?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant:",
           "\n\nHuman: Explain the history of the river city in a few words?\n\nAssistant:"]


def make_trainer(path, algo="remax", samples=1, max_answer_seq_len=8, gamma=0.9, perturb=0.0,
                 one_generation_pass=True, one_reward_pass=True, trim_prompt_padding=True,
                 fused_sampling=True):
    """A PolicyTrainer over plain modules (the engine's interface without DeepSpeed)."""
    torch.manual_seed(0)
    tok = load_hf_tokenizer(path)
    actor = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = copy.deepcopy(actor)
    if perturb:  # move the actor away from the reference so the KL terms are not zero
        with torch.no_grad():
            for p in actor.parameters():
                p.add_(perturb * torch.randn_like(p))
    reward = RewardModel(AutoModel.from_pretrained(path, dtype=torch.float32),
                         tok.pad_token_id, num_padding_at_beginning=1).eval()
    critic = copy.deepcopy(reward) if ALGORITHMS[algo].critic else None
    engine = SimpleNamespace(actor=actor, ref=ref.eval(), reward=reward, actor_ema=None,
                             critic=critic, tokenizer=tok)
    settings = AlgorithmSettings(gamma=gamma, kl_ctl=0.1, clip_reward_value=5.0,
                                 group_size=samples)
    rollout = RolloutSettings(max_answer_seq_len=max_answer_seq_len, num_samples_per_prompt=samples,
                              one_generation_pass=one_generation_pass,
                              one_reward_pass=one_reward_pass,
                              trim_prompt_padding=trim_prompt_padding,
                              fused_sampling=fused_sampling)
    return PolicyTrainer(engine, ALGORITHMS[algo], settings, rollout)


@pytest.fixture(scope="module")
def trainer(tiny_opt_path):
    return make_trainer(tiny_opt_path)


def pad_to(seq, length, pad_token_id):
    return torch.nn.functional.pad(seq, (0, length - seq.size(1)), value=pad_token_id)


def prompt_batch(tok, max_len=32):
    items = []
    for text in PROMPTS:
        ids = torch.tensor(tok(text)["input_ids"])
        items.append((ids.flip(0), torch.ones_like(ids).flip(0), tok.pad_token_id))
    batch = DataCollatorRLHF(max_len)(items)
    return batch["prompt"], batch["prompt_att_mask"]


def test_experience_layout_and_rewards(trainer):
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    P = prompts.size(1)
    torch.manual_seed(1)
    exp, stats, seconds = trainer.generate_experience(prompts, prompt_mask)
    seq, mask = exp["input_ids"], exp["attention_mask"]
    B, L = seq.shape
    T = L - P
    assert exp["logprobs"].shape == exp["ref_logprobs"].shape == exp["action_mask"].shape == (B, T)
    assert torch.equal(exp["action_mask"], mask[:, P:])
    assert seconds["generation"] > 0 and seconds["experience"] > 0
    # The reference is a copy of the actor: the per-token and full KL are zero.
    torch.testing.assert_close(exp["logprobs"], exp["ref_logprobs"])
    assert abs(stats["kl"]) < 1e-5 and stats["max_kl"] < 1e-5
    # Prompt part: the prompt's own mask (OPT's BOS </s> = pad is attended, as in generation).
    assert torch.equal(mask[:, :P], prompt_mask)
    # Answer part: every non-pad token plus exactly the first eos.
    for b in range(B):
        answer, answer_mask = seq[b, P:], mask[b, P:]
        eos = (answer == tok.eos_token_id).nonzero().flatten()
        expected = (answer != tok.pad_token_id).long()
        if len(eos):
            expected[eos[0]] = 1
        assert torch.equal(answer_mask, expected)
    # Rewards are read at the first eos after the prompt (or the last token).
    with torch.no_grad():
        values = trainer.reward.forward_value(seq, mask, return_value_only=True)
    end = answer_end_index(seq, tok.pad_token_id, P)
    torch.testing.assert_close(exp["rewards"], values[torch.arange(B), end].float())


def test_greedy_baseline_is_deterministic_and_scored(trainer):
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    P = prompts.size(1)
    trainer.actor.eval()  # generate_experience does this; dropout would make decoding random
    first = trainer._generate(prompts, prompt_mask, do_sample=False)
    torch.manual_seed(123)
    second = trainer._generate(prompts, prompt_mask, do_sample=False)
    assert torch.equal(first, second)
    torch.manual_seed(7)
    exp, stats, _ = trainer.generate_experience(prompts, prompt_mask, keep_greedy_answers=True)
    greedy = exp["greedy_input_ids"]
    # The baseline comes from the prompt alone with the same weights: it equals a fresh greedy
    # decode token for token (decoded beside the sampled rows, it may carry more trailing padding).
    fixed, _, _ = trainer._finish_sequences(first, P)
    assert torch.equal(greedy, pad_to(fixed, greedy.size(1), tok.pad_token_id))
    greedy_mask = trainer._scoring_mask(greedy, prompt_mask, P)
    with torch.no_grad():
        expected = trainer.reward.forward_value(greedy, greedy_mask, prompt_length=P)
    torch.testing.assert_close(exp["baseline_rewards"], expected["chosen_end_scores"].float())


def test_advantage_uses_sampled_minus_greedy_reward(trainer, monkeypatch):
    import algorithms

    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    torch.manual_seed(3)
    seen = {}
    real = algorithms.compute_returns

    def spy(kl, reward, *rest):
        seen["reward"] = reward.clone()
        return real(kl, reward, *rest)

    monkeypatch.setattr(algorithms, "compute_returns", spy)
    exp, stats, _ = trainer.generate_experience(prompts, prompt_mask)
    torch.testing.assert_close(seen["reward"], exp["rewards"] - exp["baseline_rewards"])
    loss, _ = trainer.compute_loss(exp)
    assert loss.requires_grad and torch.isfinite(loss)
    # With the actor equal to the reference the KL term is 0, so the returns are the discounted
    # clipped advantage alone and kl_ratio is 0.
    assert stats["kl_ratio"] == pytest.approx(0.0, abs=1e-6)
    # Same reward for sampled and greedy -> zero returns -> zero loss.
    batch = algorithms.AnswerBatch(exp["logprobs"], exp["ref_logprobs"], exp["action_mask"],
                                   exp["rewards"], exp["rewards"].clone())
    zero = ALGORITHMS["remax"].estimate(batch, trainer.settings)
    assert zero.advantages.abs().max() < 1e-6
    loss_zero, _ = trainer.compute_loss(dict(exp, advantages=zero.advantages))
    assert loss_zero.abs().item() < 1e-6


def test_k_samples_share_one_greedy_baseline(tiny_opt_path):
    trainer = make_trainer(tiny_opt_path, samples=3)
    prompts, prompt_mask = prompt_batch(trainer.tokenizer)
    torch.manual_seed(5)
    exp, stats, _ = trainer.generate_experience(prompts, prompt_mask)
    N, P = prompts.shape
    assert exp["input_ids"].shape[0] == 3 * N
    # rows are prompt-major: the three samples of prompt i are rows 3i, 3i+1, 3i+2
    assert torch.equal(exp["input_ids"][:, :P], prompts.repeat_interleave(3, dim=0))
    base = exp["baseline_rewards"].view(N, 3)
    assert torch.equal(base, base[:, :1].expand(N, 3))
    torch.testing.assert_close(base[:, 0].mean().item(), stats["greedy_reward"])


def test_ppo_experience_has_values_and_gae_returns(tiny_opt_path):
    from algorithms import gae_advantages_and_returns, last_action_one_hot
    from rl_math import kl_penalty

    trainer = make_trainer(tiny_opt_path, algo="ppo", gamma=1.0, perturb=0.02)
    prompts, prompt_mask = prompt_batch(trainer.tokenizer)
    torch.manual_seed(9)
    exp, stats, _ = trainer.generate_experience(prompts, prompt_mask)
    P = prompts.size(1)
    assert "baseline_rewards" not in exp and "greedy_reward" not in stats
    # values: the critic's V before each answer action (positions P-1 .. L-2), without dropout
    trainer.critic.eval()
    with torch.no_grad():
        values = trainer.critic.forward_value(exp["input_ids"], exp["attention_mask"],
                                              return_value_only=True)
    torch.testing.assert_close(exp["values"], values[:, P - 1:-1])
    rewards = kl_penalty(exp["logprobs"], exp["ref_logprobs"], 0.1) \
        + exp["rewards"].clamp(-5, 5)[:, None] * last_action_one_hot(exp["action_mask"])
    adv, ret = gae_advantages_and_returns(rewards, exp["values"], exp["action_mask"], 1.0, 0.95)
    torch.testing.assert_close(exp["advantages"], adv)
    torch.testing.assert_close(exp["returns"], ret)
    loss = trainer.compute_value_loss(exp)
    assert loss.requires_grad and loss.item() > 0


PIN = os.path.join(os.path.dirname(__file__), "data", "remax_pin.json")


def test_remax_numbers_unchanged_by_the_refactor(tiny_opt_path):
    """Experience, loss and gradients of ReMax on a fixed batch equal the values the ReMax-only
    trainer produced (tests/data/remax_pin.json, written by it) to 1e-6."""
    pin = json.load(open(PIN))
    weights = sum(p.double().sum().item()
                  for p in AutoModelForCausalLM.from_pretrained(tiny_opt_path).parameters())
    assert weights == pytest.approx(pin["model_weight_sum"], rel=1e-9), \
        "the tiny OPT fixture changed; the pin no longer applies"
    # the faithful path: two decoding passes, as the ReMax-only trainer ran them; the reward model
    # scores sampled and greedy answers in one pass (which must not change a reward)
    trainer = make_trainer(tiny_opt_path, max_answer_seq_len=10, gamma=0.95, perturb=0.02,
                           one_generation_pass=False, one_reward_pass=True,
                           trim_prompt_padding=False, fused_sampling=False)
    prompts = torch.tensor(pin["prompts"])
    prompt_mask = torch.tensor(pin["prompt_mask"])
    torch.manual_seed(42)
    exp, stats, _ = trainer.generate_experience(prompts, prompt_mask, keep_greedy_answers=True)
    assert exp["input_ids"].tolist() == pin["sampled_seq"]
    assert exp["greedy_input_ids"].tolist() == pin["greedy_seq"]
    close = lambda a, b: pytest.approx(b, rel=1e-6, abs=1e-6) == a  # noqa: E731
    assert close(exp["rewards"].tolist(), pin["rewards"])
    assert close(exp["baseline_rewards"].tolist(), pin["baseline_rewards"])
    assert close(exp["logprobs"].sum().item(), pin["logprob_sum"])
    assert close(exp["ref_logprobs"].sum().item(), pin["ref_logprob_sum"])
    assert close(stats["kl_ratio"], pin["kl_ratio"])
    assert close(exp["advantages"].sum().item(), pin["returns_sum"])
    trainer.actor.zero_grad()
    trainer.actor.eval()  # no dropout, as when the pin was written
    loss, _ = trainer.compute_loss(exp)
    loss.backward()
    assert close(loss.item(), pin["loss"])
    grads = {n: p.grad.norm().item() for n, p in trainer.actor.named_parameters()
             if p.grad is not None}
    assert grads.keys() == pin["grad_norms"].keys()
    for name, norm in pin["grad_norms"].items():
        assert close(grads[name], norm), name


def test_one_pass_greedy_rows_equal_a_separate_greedy_decode(tiny_opt_path):
    trainer = make_trainer(tiny_opt_path, samples=2, max_answer_seq_len=12)
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    trainer.actor.eval()
    torch.manual_seed(11)
    sampled, greedy = trainer._decode(prompts, prompt_mask, 2, with_greedy=True)
    assert sampled.shape[0] == 6 and greedy.shape[0] == 3 and sampled.shape[1] == greedy.shape[1]
    separate = trainer._generate(prompts, prompt_mask, do_sample=False)
    assert torch.equal(greedy, pad_to(separate, greedy.size(1), tok.pad_token_id))


def reference_top_k_top_p_step(logits, top_k=50, top_p=0.9):
    """The sampling distribution by hand: keep the top_k largest logits, then the smallest set of
    the largest whose probability reaches top_p (at least one), renormalise."""
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    ascending, order = torch.sort(logits, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("fused", [False, True])
def test_one_pass_sampled_rows_follow_the_top_k_top_p_distribution(tiny_opt_path, fused):
    """Replays the one-pass decode with a hand-written sampler (full forward at every step, the same
    RNG stream): sampled rows follow top-k 50 then top-p 0.9, greedy rows take the arg-max. HF's
    warpers draw over the whole vocabulary; the fused sampler over the top-k candidates."""
    trainer = make_trainer(tiny_opt_path, samples=2, max_answer_seq_len=6, fused_sampling=fused)
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    trainer.actor.eval()
    torch.manual_seed(21)
    sampled, greedy = trainer._decode(prompts, prompt_mask, 2, with_greedy=True)
    produced = torch.cat([sampled, greedy])

    torch.manual_seed(21)
    seq = torch.cat([prompts.repeat_interleave(2, dim=0), prompts])
    mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), prompt_mask])
    greedy_rows = torch.arange(seq.size(0)) >= 6
    finished = torch.zeros(seq.size(0), dtype=torch.bool)
    for _ in range(produced.size(1) - prompts.size(1)):
        with torch.no_grad():
            logits = trainer.actor(seq, attention_mask=mask).logits[:, -1].float()
        probs = reference_top_k_top_p_step(logits)
        argmax = logits.argmax(-1, keepdim=True)
        if fused:  # a draw among the top-k candidates, in descending order
            candidates = torch.topk(logits, 50, dim=-1).indices
            token = candidates.gather(1, torch.multinomial(probs.gather(1, candidates), 1))
            token = torch.where(greedy_rows[:, None], argmax, token).squeeze(1)
        else:
            one_hot = torch.zeros_like(probs).scatter(1, argmax, 1.0)
            probs = torch.where(greedy_rows[:, None], one_hot, probs)
            token = torch.multinomial(probs, 1).squeeze(1)
        token = torch.where(finished, torch.full_like(token, tok.pad_token_id), token)
        finished |= token == tok.eos_token_id
        seq = torch.cat([seq, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    assert torch.equal(seq, produced)


def test_fused_sampler_has_the_distribution_of_hf_top_k_top_p_warpers():
    """On random logits (several scales: flat to peaked), the fused sampler's candidate
    probabilities equal HF's TopK(50) + TopP(0.9) warpers' distribution; its draws follow it."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from sampling import TopKTopPSampler

    torch.manual_seed(5)
    logits = torch.randn(6, 300) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])[:, None]
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(50)(None, logits.clone()))
    expected = warped.softmax(dim=-1)
    sampler = TopKTopPSampler(50, 0.9)
    tokens, probs = sampler.candidates(logits)
    got = torch.zeros_like(expected).scatter(1, tokens, probs / probs.sum(-1, keepdim=True))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (probs > 0).sum(-1).tolist() == (expected > 0).sum(-1).tolist()
    # Draws: one finite score per row, at a token of positive probability; greedy rows: arg-max.
    greedy = torch.tensor([False, False, False, False, True, True])
    out = TopKTopPSampler(50, 0.9, greedy_rows=greedy)(None, logits)
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 6
    chosen = out.argmax(-1)
    assert (expected.gather(1, chosen[:, None]) > 0).all()
    assert torch.equal(chosen[4:], logits[4:].argmax(-1))
    counts = torch.zeros(300)
    row = logits[2:3].expand(20000, -1)
    for token in TopKTopPSampler(50, 0.9)(None, row).argmax(-1):
        counts[token] += 1
    torch.testing.assert_close(counts / 20000, expected[2], atol=0.015, rtol=0)


def test_rewards_in_one_forward_equal_separate_forwards(tiny_opt_path):
    trainer = make_trainer(tiny_opt_path, max_answer_seq_len=8)
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    P = prompts.size(1)
    torch.manual_seed(4)
    trainer.actor.eval()
    sampled = trainer._generate(prompts, prompt_mask, do_sample=True)
    greedy = trainer._generate(prompts, prompt_mask, do_sample=False)
    # a batch that ended after one token, whose reward is read at its last column
    short = torch.cat([prompts, torch.full((3, 1), tok.encode(" ", add_special_tokens=False)[-1])], 1)
    batches = [(s, trainer._scoring_mask(s, prompt_mask, P)) for s in (sampled, greedy, short)]
    together = trainer._rewards_together(batches, P)
    separate = torch.cat([trainer._reward(s, m, P) for s, m in batches])
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_trimmed_prompt_padding_changes_no_reward_or_log_prob(family, tiny_opt_path,
                                                              tiny_llama_path):
    """Prompts padded to the batch's longest instead of max_prompt_seq_len: the same answers get
    the same rewards and log-probs (OPT's positions come from the mask; Llama's rotary attention
    depends on relative positions only)."""
    from rl_math import trim_left_padding

    trainer = make_trainer(tiny_opt_path if family == "opt" else tiny_llama_path)
    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok, max_len=96)
    trimmed, trimmed_mask = trim_left_padding(prompts, prompt_mask)
    cut = prompts.size(1) - trimmed.size(1)
    assert cut > 0 and torch.equal(prompt_mask[:, :cut], torch.zeros_like(prompt_mask[:, :cut]))
    trainer.actor.eval()
    torch.manual_seed(2)
    answers = trainer._generate(trimmed, trimmed_mask, do_sample=True)[:, trimmed.size(1):]
    results = []
    for p, m in ((prompts, prompt_mask), (trimmed, trimmed_mask)):
        seq = torch.cat([p, answers], dim=1)
        mask = trainer._scoring_mask(seq, m, p.size(1))
        with torch.no_grad():
            exp, _ = trainer._score_policy(seq, mask, p.size(1))
            results.append((trainer._reward(seq, mask, p.size(1)), exp["logprobs"],
                            exp["ref_logprobs"]))
    for full, short in zip(*results):
        torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-5)


class FakeEngine:
    """A DeepSpeed engine's training interface over a plain module: backward accumulates, step
    does nothing (the test compares the accumulated gradients)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def is_gradient_accumulation_boundary(self):
        return False        # never steps: the gradients accumulate over the whole test

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()


@pytest.mark.parametrize("one_forward, chunk_tokens", [(True, None), (False, 4), (True, 4)])
def test_one_actor_forward_and_chunked_logits_equal_the_faithful_path(tiny_opt_path, one_forward,
                                                                     chunk_tokens):
    """The update forward scoring the policy (log-probs for the KL penalty = its detached values)
    and the LM head run over a few answer tokens at a time (4 tokens: 1-2 positions per chunk)
    each give the experience, loss, metrics and gradients of the faithful path (a separate no-grad
    scoring forward, full logits), over two prompt batches cut into several micro-batches;
    dropout off."""
    from transformers import AutoConfig

    from utils.data.data_utils import MiniDataset
    from utils.model.model_utils import disable_dropout_in_config

    config = AutoConfig.from_pretrained(tiny_opt_path)
    disable_dropout_in_config(config)
    results = []
    for one, chunk in ((False, None), (one_forward, chunk_tokens)):
        trainer = make_trainer(tiny_opt_path, samples=2, perturb=0.02)
        torch.manual_seed(0)
        actor = AutoModelForCausalLM.from_pretrained(tiny_opt_path, config=config)
        with torch.no_grad():
            for p in actor.parameters():
                p.add_(0.02 * torch.randn_like(p))
        trainer.actor = FakeEngine(actor)
        trainer.rollout = RolloutSettings(max_answer_seq_len=8, num_samples_per_prompt=2,
                                          one_actor_forward=one, logit_chunk_tokens=chunk)
        buffer = MiniDataset(2, 4)  # 2 prompt batches of 3 prompts x 2 samples -> 4 micro-batches
        prompts, prompt_mask = prompt_batch(trainer.tokenizer)
        torch.manual_seed(17)
        stats = []
        for _ in range(2):
            exp, round_stats, _ = trainer.generate_experience(prompts, prompt_mask)
            stats.append(round_stats)
            micro_batches = buffer.add(exp)
        assert [len(m["input_ids"]) for m in micro_batches] == [4, 2, 4, 2]
        means = trainer.train_step(micro_batches)
        grads = {n: p.grad.clone() for n, p in actor.named_parameters()}
        results.append((means, grads, micro_batches, stats))
    (faithful, faithful_grads, faithful_exp, faithful_stats), (got, got_grads, got_exp, got_stats) = results
    for a, b in zip(faithful_exp, got_exp):
        assert torch.equal(a["input_ids"], b["input_ids"])
        for key in ("logprobs", "ref_logprobs", "advantages"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    if not one_forward:  # the metrics of the scoring forward, per round
        for a, b in zip(faithful_stats, got_stats):
            for key in ("kl", "max_kl", "entropy"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)
    assert got["actor_loss"] == pytest.approx(faithful["actor_loss"], rel=1e-5, abs=1e-6)
    if one_forward:  # the update forward reports the scoring metrics
        for key in ("kl", "entropy", "return", "advantage"):
            assert key in got
    for name, grad in faithful_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chunked_scores_equal_full_logits_under_zero3_on_two_ranks(tiny_opt_path, tmp_path):
    """Under ZeRO-3 (actor and reference partitioned, the head tied to the embedding) on 2 ranks
    whose answers differ in length, so they need different numbers of chunks: the chunked scores
    and the gathered gradients equal those of full logits, and no rank hangs."""
    from stage_runner import ROOT, free_port, run_command

    out = tmp_path / "result.json"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    code, output = run_command([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                                os.path.join(ROOT, "tests", "zero3_chunked_scores.py"),
                                "--model", tiny_opt_path, "--out", str(out)], timeout=300)
    assert code == 0, output[-3000:]
    result = json.loads(out.read_text())
    assert result["keys"] == ["entropy", "full_kl", "logprobs", "ref_logprobs"]
    assert result["kl"] > 0 and result["grad_scale"] > 0.1
    assert result["score_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5 * result["grad_scale"] + 1e-6
