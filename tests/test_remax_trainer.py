"""The ReMax trainer's experience on plain (non-DeepSpeed) tiny models: the greedy baseline is
deterministic and comes from the prompt alone, rewards are read at each answer's first eos, the
action mask keeps exactly the first eos, and advantage = r(sampled) - r(greedy)."""
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from remax_trainer import ReMaxTrainer
from utils.data.data_utils import DataCollatorRLHF
from utils.model.model_utils import load_hf_tokenizer
from utils.model.reward_model import RewardModel, answer_end_index

PROMPTS = ["\n\nHuman: Tell me about the moon?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant:",
           "\n\nHuman: Explain the history of the river city in a few words?\n\nAssistant:"]


@pytest.fixture(scope="module")
def trainer(tiny_opt_path):
    torch.manual_seed(0)
    tok = load_hf_tokenizer(tiny_opt_path)
    actor = AutoModelForCausalLM.from_pretrained(tiny_opt_path, dtype=torch.float32).eval()
    reward = RewardModel(AutoModel.from_pretrained(tiny_opt_path, dtype=torch.float32),
                         tok.pad_token_id, num_padding_at_beginning=1).eval()
    engine = SimpleNamespace(actor=actor, ref=copy.deepcopy(actor), reward=reward, actor_ema=None,
                             tokenizer=tok)
    args = SimpleNamespace(max_answer_seq_len=8, kl_ctl=0.1, gamma=0.9, clip_reward_value=5.0,
                           actor_zero_stage=0, actor_gradient_checkpointing=False, unsup_coef=0.0)
    return ReMaxTrainer(engine, args)


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
    exp = trainer.generate_experience(prompts, prompt_mask)
    seq, mask = exp["input_ids"], exp["attention_mask"]
    B, L = seq.shape
    assert exp["logprobs"].shape == exp["ref_logprobs"].shape == (B, L - 1)
    assert exp["full_kl"].shape == exp["entropy"].shape == (B, L)
    # The reference is a copy of the actor: the per-token and full KL are zero.
    torch.testing.assert_close(exp["logprobs"], exp["ref_logprobs"])
    assert exp["full_kl"].abs().max() < 1e-5
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
    exp = trainer.generate_experience(prompts, prompt_mask)
    greedy = exp["greedy_input_ids"]
    # The baseline comes from the prompt alone with the same weights: it equals a fresh greedy decode.
    fixed, _, _ = trainer._finish_sequences(first, P)
    assert torch.equal(greedy, fixed)
    greedy_mask = trainer._scoring_mask(greedy, prompt_mask, P)
    with torch.no_grad():
        expected = trainer.reward.forward_value(greedy, greedy_mask, prompt_length=P)
    torch.testing.assert_close(exp["baseline_rewards"], expected["chosen_end_scores"].float())


def test_loss_uses_sampled_minus_greedy_reward(trainer, monkeypatch):
    import remax_trainer

    tok = trainer.tokenizer
    prompts, prompt_mask = prompt_batch(tok)
    torch.manual_seed(3)
    exp = trainer.generate_experience(prompts, prompt_mask)
    seen = {}
    real = remax_trainer.compute_returns

    def spy(kl, reward, *rest):
        seen["reward"] = reward.clone()
        return real(kl, reward, *rest)

    monkeypatch.setattr(remax_trainer, "compute_returns", spy)
    loss, returns, kl_ratio = trainer.compute_loss(exp)
    torch.testing.assert_close(seen["reward"], exp["rewards"] - exp["baseline_rewards"])
    assert loss.requires_grad and torch.isfinite(loss)
    # With the actor equal to the reference the KL term is 0, so the returns are the discounted
    # clipped advantage alone and kl_ratio is 0.
    assert kl_ratio == pytest.approx(0.0, abs=1e-6)
    # Same reward for sampled and greedy -> zero returns -> zero loss.
    exp_equal = dict(exp, baseline_rewards=exp["rewards"].clone())
    loss_zero, returns_zero, _ = trainer.compute_loss(exp_equal)
    assert returns_zero.abs().max() < 1e-6 and loss_zero.abs().item() < 1e-6
