"""GRPO (Stage 3): the rewards on hand-computed cases, advantages, each loss aggregation against a
hand-written loop, REINFORCE equivalence of the gradient, rollouts on the KV cache, learning on a
trivial reward, DDP / FSDP2 parity with one process, and the script (resume, evaluation, bad input)."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import grpo  # noqa: E402
import sft  # noqa: E402
import vlm  # noqa: E402
from common import run, write_json  # noqa: E402
# Stage 2's test fixtures (tok_ckpt, world) come from conftest.py, with the tiny VLM builder
from conftest import build  # noqa: E402
from data.tasks import NO_TARGET  # noqa: E402
from samtok import codes_to_text, mask_tokens  # noqa: E402

import ddp_grpo  # noqa: E402

W = lambda c1, c2: codes_to_text([[c1, c2]])      # one mask's four words
A, B, C = W(3, 7), W(5, 9), W(40, 41)
NT = NO_TARGET


# ---------------------------------------------------------------- rewards by hand
@pytest.mark.parametrize("text, answer, r", [
    (A, A, 1.0),
    (A + B, B + A, 1.0),                 # order does not matter: spans are matched as a set
    (A, A + B, 0.5),                     # one of two targets: 1 / max(1, 2)
    (A + B + C, A + B, 2 / 3),           # an extra span: 2 / max(3, 2)
    (A + A, A, 0.5),                     # a duplicate: N_pred = 2 before de-duplication, N_TP = 1
    (A + A + B, A + B, 2 / 3),
    (C, A, 0.0),
    (NT, A, 0.0),                        # "No target." when there is one
    (NT, NT, 1.0), (" No target.\n", NT, 1.0),
    (A, NT, 0.0),                        # a mask when there is none
    (NT + A, NT, 0.0),
    ("", NT, 0.0), ("", A, 0.0),
    ("a red circle <|mt_9999|> <|mt_start|>", A, 0.0),          # garbage, an out-of-range word
    ("<|mt_start|><|mt_0003|><|mt_end|>", A, 0.0),               # level 1 only: not the same span
    ("xx" + A + "yy", A, 1.0),           # text around a span does not change the span match
])
def test_reward_match(text, answer, r):
    assert grpo.reward_match(text, answer) == pytest.approx(r)


@pytest.mark.parametrize("text, answer, r", [
    (A, A, 1.0),
    (W(3, 100), A, 0.5),                 # level-1 word right, level-2 wrong: half
    ("<|mt_start|><|mt_0003|><|mt_end|>", A, 0.5),               # level 1 only: half
    (W(3, 100) + W(3, 101), A, 0.25),    # one half credit per ground-truth span: 0.5 / max(2, 1)
    (A + W(3, 100), A, 0.5),             # A already matched exactly: no half credit left, 1 / 2
    (W(3, 100) + W(5, 100), A + B, 0.5), # two halves: (0.5 + 0.5) / 2
    (W(3, 100) + W(3, 100), A, 0.25),    # duplicates count in N_pred: 0.5 / 2
    (C, A, 0.0), (NT, NT, 1.0), (A, NT, 0.0), ("garbage", A, 0.0),
])
def test_reward_match_partial(text, answer, r):
    assert grpo.reward_match_partial(text, answer) == pytest.approx(r)


def test_reward_iou_and_format():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True                                      # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:2, :3] = True                                      # 6 pixels, 4 shared
    assert grpo.reward_iou(a, b) == pytest.approx(4 / 6)
    assert grpo.reward_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0    # no target, no prediction
    assert grpo.reward_iou(a, np.zeros_like(a)) == 0.0
    f = grpo.reward_format
    assert f(A + B, "refer", True) == 1.0 and f(NT, "refer", True) == 1.0
    assert f(A, "refer", False) == 0.0                    # cut at max_new_tokens
    assert f(A + " and more", "refer", True) == 0.0       # text besides the masks
    assert f("<|mt_start|><|mt_0003|><|mt_end|>", "refer", True) == 0.0     # a level missing
    assert f("<|mt_start|><|mt_0300|><|mt_0003|><|mt_end|>", "refer", True) == 0.0   # levels swapped
    assert f("", "refer", True) == 0.0
    assert f("a <|object_ref_start|>red circle<|object_ref_end|>" + A + ".", "gcg", True) == 1.0
    assert f("a red circle<|mt_0003|>.", "gcg", True) == 0.0


def test_score_decodes_each_distinct_mask_once_per_image():
    """score_rollouts() with the iou reward: a fake decoder paints code c1 as row c1 of an 8 x 8 image; masks
    of one image are decoded in one call, each distinct mask once; format reward added on top."""
    calls = []

    def decode(img, codes):
        calls.append((img, [tuple(c) for c in codes]))
        out = np.zeros((len(codes), 8, 8), bool)
        for k, (c1, _) in enumerate(codes):
            out[k, c1] = True
        return out

    gt = {0: np.zeros((8, 8), bool), 1: np.zeros((8, 8), bool)}
    gt[0][3] = gt[0][5] = True                               # prompt 0: rows 3 and 5; prompt 1: no target
    prompts = [dict(img=0, task="refer", answer=W(3, 7) + W(5, 9)), dict(img=0, task="refer", answer=NT),
               dict(img=1, task="refer", answer=W(3, 7))]
    gt[2] = np.zeros((8, 8), bool)
    gt[2][3] = True
    rows = [dict(prompt=0, text=W(3, 7), finished=True), dict(prompt=0, text=W(3, 7) + W(5, 1), finished=False),
            dict(prompt=1, text=NT, finished=True), dict(prompt=1, text=W(5, 1), finished=True),
            dict(prompt=2, text="garbage", finished=True)]
    cfg = dict(grpo.DEFAULTS, reward="iou", format_weight=0.5)
    R = grpo.score_rollouts(rows, prompts, cfg, decode, lambda p: gt[prompts.index(p)])
    assert R == pytest.approx([0.5 + 0.5, 1.0 + 0.0, 1.0 + 0.5, 0.0 + 0.5, 0.0 + 0.0])
    assert sorted(calls) == [(0, [(3, 7), (5, 1)])]           # image 0 once, (3, 7) once; image 1: nothing to decode
    assert grpo.score_rollouts(rows, prompts, dict(cfg, reward="match", format_weight=0.0)) == \
        pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0])


def test_advantages_both_scales():
    R = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 1.0]])
    A_g, eq = grpo.advantages(R, "group")
    A_n, eq2 = grpo.advantages(R, "none")
    assert eq.tolist() == eq2.tolist() == [False, True, False]
    for g in range(3):
        m = sum(R[g].tolist()) / 4
        sd = math.sqrt(sum((x - m) ** 2 for x in R[g].tolist()) / 3)      # unbiased
        for i in range(4):
            assert A_n[g, i].item() == pytest.approx(R[g, i].item() - m, abs=1e-6)
            assert A_g[g, i].item() == pytest.approx((R[g, i].item() - m) / (sd + grpo.ADV_EPS), abs=1e-5)
    assert (A_g[1] == 0).all() and (A_n[1] == 0).all()


# ---------------------------------------------------------------- the loss against loops
def loop_loss(logp, old, ref, adv, mask, cfg):
    """The GRPO objective written out token by token, in plain Python floats."""
    N, L = len(logp), len(logp[0])
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(N):
        terms = []
        for t in range(L):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(r, 1 - cfg["eps_low"]), 1 + cfg["eps_high"])
            term = -min(r * adv[i], clipped * adv[i])
            if cfg["beta"]:
                d = ref[i][t] - logp[i][t]
                term += cfg["beta"] * (math.exp(d) - d - 1)
            terms.append(term)
        per_seq.append(sum(terms) / len(terms))
        total, n_tok = total + sum(terms), n_tok + len(terms)
    return {"grpo": sum(per_seq) / N, "dr_grpo": total / (N * cfg["max_new_tokens"]), "dapo": total / n_tok}[cfg["loss_type"]]


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_policy_loss_matches_the_loop(loss_type, beta):
    g = torch.Generator().manual_seed(1)
    N, L = 5, 6
    logp = -torch.rand(N, L, generator=g) * 3
    old = logp + torch.randn(N, L, generator=g) * 0.4          # ratios well outside the clip range too
    ref = logp + torch.randn(N, L, generator=g) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.0, 0.5, -1.5])
    lengths = [6, 3, 1, 4, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths])
    cfg = dict(grpo.DEFAULTS, loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, max_new_tokens=8)
    loss, stats = grpo.policy_loss(logp, old, ref, adv, mask, cfg, n_seqs=N, n_tokens=mask.sum())
    want = loop_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), cfg)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # micro-batches add up to the step's loss: the normalisers are the step's, not the micro-batch's
    parts = [grpo.policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], cfg, N, mask.sum())[0]
             for s in (slice(0, 2), slice(2, 5))]
    assert sum(parts).item() == pytest.approx(want, rel=1e-5)
    # what lies outside the mask is never used, even -inf (a prompt token the policy cannot write)
    nan_logp = logp.masked_fill(mask == 0, -math.inf).requires_grad_()
    out, _ = grpo.policy_loss(nan_logp, old.masked_fill(mask == 0, -math.inf), ref.masked_fill(mask == 0, -math.inf),
                              adv, mask, cfg, N, mask.sum())
    out.backward()
    assert out.item() == pytest.approx(want, rel=1e-5) and torch.isfinite(nan_logp.grad).all()
    r = torch.exp(logp - old)
    low = ((r < 0.8) & (adv[:, None] < 0) & (mask > 0)).sum()
    high = ((r > 1.28) & (adv[:, None] > 0) & (mask > 0)).sum()
    assert low > 0 and high > 0
    assert stats[1] == low and stats[2] == high and stats[3] == mask.sum()
    d = ref - logp
    assert stats[0].item() == pytest.approx(((torch.exp(d) - d - 1) * mask).sum().item() if beta else 0.0, rel=1e-5)


# ---------------------------------------------------------------- on the tiny VLM
@pytest.fixture(scope="module")
def policy(world):
    """The tiny config-built VLM with the mask words, its prompts (refer, tokenized) and images."""
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    sft.add_mask_tokens(model, processor)
    refer = [s for s in samples if s["task"] == "refer"]
    prompts = grpo.tokenize_prompts(refer, images, processor)
    return model, processor, prompts, images


def fixed_rows(processor, n_groups, G, seed=0, lengths=(1, 5)):
    """Completions of random mask words ending with <|im_end|>, of different lengths, rewards at
    random: what a rollout would hand to the update."""
    tok = processor.tokenizer
    words = tok.convert_tokens_to_ids(mask_tokens())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        for i in range(G):
            n = int(rng.integers(*lengths))
            rows.append(dict(prompt=g, ids=[int(x) for x in rng.choice(words, n)] + [end], reward=float(rng.random())))
    R = torch.tensor([r["reward"] for r in rows]).view(n_groups, G)
    return rows, R


@pytest.mark.parametrize("loss_type, scale", [("grpo", "group"), ("dr_grpo", "none"), ("dapo", "group")])
def test_gradient_is_reinforce_with_the_group_baseline(policy, loss_type, scale):
    """mu = 1, beta = 0: the ratio is 1 and never clipped, so the gradient of the GRPO loss is
    REINFORCE's, -sum_i c_i A_i sum_t grad log pi(o_it), with A_i the group-relative advantage and
    c_i the aggregation's weight. Here log pi is computed independently: one unpadded sequence at a
    time. The update runs on micro-batches of 2 with SGD lr 1, so its weight change is -gradient."""
    model, processor, prompts, images = policy
    G, T_ = 3, 0.7
    rows, R = fixed_rows(processor, 3, G)
    A_, _ = grpo.advantages(R, scale)
    for r, a in zip(rows, A_.flatten().tolist()):
        r["adv"] = a
    cfg = dict(grpo.DEFAULTS, loss_type=loss_type, scale_rewards=scale, micro_batch=2, temperature=T_,
               max_new_tokens=6, grad_clip=1e9, beta=0.0, num_iterations=1)
    m1 = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in m1.named_parameters()}
    grpo.update(m1, torch.optim.SGD(m1.parameters(), lr=1.0), rows, prompts, images, processor, cfg)

    m2 = copy.deepcopy(model).train()
    n_tok = sum(len(r["ids"]) for r in rows)
    bias = grpo.banned_tokens(processor, full_rows(model), "cpu")
    surrogate = 0
    for r in rows:
        p = prompts[r["prompt"]]
        batch, _ = vlm.collate([dict(img=p["img"], ids=p["ids"] + r["ids"], in_loss=[False] * len(p["ids"] + r["ids"]))],
                               images, processor)
        logits = m2(**batch).logits[0, len(p["ids"]) - 1:-1] / T_ + bias      # pi: softmax over text tokens
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r["ids"])[:, None]).sum()
        c = {"grpo": 1 / (len(rows) * len(r["ids"])), "dr_grpo": 1 / (len(rows) * 6), "dapo": 1 / n_tok}[loss_type]
        surrogate = surrogate - c * r["adv"] * logp
    surrogate.backward()
    worst, after = 0, dict(m1.named_parameters())
    for k, p in m2.named_parameters():
        if p.grad is None:
            continue
        delta = before[k] - after[k].detach()
        assert torch.allclose(delta, p.grad, atol=1e-6, rtol=1e-3), k
        worst = max(worst, p.grad.abs().max().item())
    assert worst > 1e-4          # the gradient is not trivially zero


def test_rollout_on_the_cache_matches_greedy_and_the_full_forward(policy):
    """The prompt is prefilled once and its cache repeated G times. At a temperature near 0 every
    row must be Stage 2's greedy generate; at temperature 1 the log-probs recorded while sampling
    must be the full-sequence forward's (the one the loss uses): same positions, same cache."""
    model, processor, prompts, images = policy
    model.eval()
    ps = prompts[:3]
    greedy = vlm.generate(model, processor, ps, images, 8, 8)
    g = torch.Generator().manual_seed(0)
    comps = grpo.rollout(model, processor, ps, images, 2, 8, 1e-6, g)
    assert [grpo.completion_text(processor, c["ids"]) for c in comps] == [t for t in greedy for _ in range(2)]
    comps = grpo.rollout(model, processor, ps, images, 3, 8, 1.0, g)
    assert len({tuple(c["ids"]) for c in comps}) > 3             # sampled, not copies
    rows = [dict(prompt=k // 3, ids=c["ids"]) for k, c in enumerate(comps)]
    samples = [dict(img=ps[r["prompt"]]["img"], ids=ps[r["prompt"]]["ids"] + r["ids"],
                    in_loss=[False] * len(ps[r["prompt"]]["ids"]) + [True] * len(r["ids"])) for r in rows]
    batch, labels = vlm.collate(samples, images, processor, left_pad=True)
    n = max(len(c["ids"]) for c in comps)
    with torch.no_grad():
        full = vlm.completion_logps(model, batch, n, 1.0, grpo.banned_tokens(processor, full_rows(model), "cpu"))
    for k, c in enumerate(comps):
        assert torch.allclose(full[k, n - len(c["ids"]):], torch.tensor(c["logps"]), atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("per_batch", [3, 4])        # 3: every micro-batch one whole group; 4: groups split
def test_shared_prefix_equals_the_unshared_forward(world, model_type, per_batch):
    """The shared-prefix forward (each prompt once, its completions on its key/value cache) gives
    the log-probs and the gradients of one forward of prompt + completion per row, in fp32."""
    images, samples, scenes, cfg = world
    model, processor = build(cfg, model_type=model_type)
    sft.add_mask_tokens(model, processor)
    prompts = grpo.tokenize_prompts([s for s in samples if s["task"] == "refer"], images, processor)
    rows, _ = fixed_rows(processor, 3, 3, lengths=(1, 6))
    assert len({len(r["ids"]) for r in rows[:3]}) > 1          # padded: completions of several lengths
    bias = grpo.banned_tokens(processor, full_rows(model), "cpu")
    model.train()
    for i in range(0, len(rows), per_batch):
        chunk, grads = rows[i:i + per_batch], []
        for share in (False, True):
            b = vlm.completion_batch(chunk, prompts, images, processor, share, "cpu")
            logp = vlm.batch_logps(model, b, 0.7, bias)
            model.zero_grad()
            (logp * b["mask"]).sum().backward()
            # right-aligned (unshared) and left-aligned (shared) windows -> each row's own tokens
            grads.append(([lp[m > 0] for lp, m in zip(logp.detach(), b["mask"])],
                          {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        (lp_u, g_u), (lp_s, g_s) = grads
        for a, b_ in zip(lp_u, lp_s):
            assert torch.allclose(a, b_, atol=1e-5), (a - b_).abs().max()
        assert g_u.keys() == g_s.keys() and len(g_u) > 10
        for k in g_u:
            # fp32 sums in another order: equal to 1e-5 of the tensor's own scale (the tied
            # embedding's gradient reaches ~70, so an element-wise rtol would judge its rounding)
            err, scale = (g_u[k] - g_s[k]).abs().max(), g_u[k].abs().max()
            assert err <= 1e-5 * (1 + scale), (k, err, scale)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_decode_step_is_the_model_forward(world, model_type):
    """Sampling's hand-wired decode step gives the logits and the grown cache of the model's own
    forward on the same cache, in fp32: left-padded prompts, rows at different text positions,
    a few tokens in a row."""
    images, samples, scenes, cfg = world
    model, processor = build(cfg, model_type=model_type)
    sft.add_mask_tokens(model, processor)
    model.eval()
    assert vlm.lean_decoding(model)
    prompts = grpo.tokenize_prompts([s for s in samples if s["task"] == "refer"][:3], images, processor)
    inputs, _ = vlm.collate(prompts, images, processor, left_pad=True)
    assert inputs["attention_mask"].min() == 0                       # padded: prompts of several lengths
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    nxt, att = pos.amax(dim=(0, 2)) + 1, inputs["attention_mask"]
    with torch.no_grad():
        caches = [model(**inputs, position_ids=pos, use_cache=True).cache for _ in range(2)]
        for t, new in enumerate(torch.tensor([[5, 9, 40], [7, 7, 3], [100, 2, 11]])):
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
            hf = model(input_ids=new[:, None], attention_mask=att, position_ids=(nxt + t).view(1, -1, 1).expand(3, -1, 1),
                       cache=caches[0], use_cache=True).logits[:, -1]
            lean = vlm.decode_step(model, caches[1], new, nxt + t, att)
            assert torch.allclose(hf, lean, atol=1e-5), (hf - lean).abs().max()
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def full_rows(model):
    return model.get_output_embeddings().weight.shape[0]


def test_a_few_grpo_steps_raise_a_trivially_learnable_reward(policy):
    """Reward = share of the completion's tokens that are mask words (514 of the ~1,100 words: ~1/2 for the random policy).
    Rollouts, group advantages and updates, all real; 12 steps of 4 prompts x 8 completions."""
    model, processor, prompts, images = policy
    model = copy.deepcopy(model)
    words = set(processor.tokenizer.convert_tokens_to_ids(mask_tokens()))
    cfg = dict(grpo.DEFAULTS, max_new_tokens=4, micro_batch=32, beta=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    G, means = 8, []
    for step in range(12):
        idx = [(4 * step + k) % len(prompts) for k in range(4)]
        model.eval()
        comps = grpo.rollout(model, processor, [prompts[j] for j in idx], images, G, 4, 1.0, g)
        model.train()
        R = torch.tensor([np.mean([x in words for x in c["ids"]]) for c in comps]).view(-1, G)
        adv, equal = grpo.advantages(R)
        rows = [dict(prompt=idx[k // G], ids=c["ids"], adv=a) for k, (c, a) in enumerate(zip(comps, adv.flatten().tolist()))
                if not equal[k // G]]
        grpo.update(model, opt, rows, prompts, images, processor, cfg)
        means.append(R.mean().item())
    assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.25, means


# ---------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def sft_ckpt(world, tmp_path_factory):
    """A Stage-2 output folder: the tiny VLM after 40 SFT steps on the referring samples, so that
    it answers in mask words and ends its turn."""
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    refer = [[s] for s in samples if s["task"] == "refer"]
    ss, _ = vlm.tokenize(refer, images, processor, 10 ** 9)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch, labels = vlm.collate(ss[8 * step % len(ss):][:8] or ss[:8], images, processor)
        loss, _ = sft.token_loss(model, batch, labels, ids)
        opt.zero_grad()
        (loss / (labels != -100).sum()).backward()
        opt.step()
    out = tmp_path_factory.mktemp("sft_out")
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return str(out)


def run_main(monkeypatch, capsys, args):
    """grpo.py as its __main__ runs it (common.run: a UserError -> one line, exit 2)."""
    monkeypatch.setattr(sys, "argv", ["grpo.py", *args])
    code = 0
    try:
        run(grpo.main)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def script_args(tok_ckpt, sft_ckpt, out):
    return [f"--init_from={sft_ckpt}", f"--tokenizer_ckpt={tok_ckpt}", f"--out_dir={out}", "--n_train=6",
            "--batch_size=8", "--num_generations=4", "--micro_batch=4", "--max_new_tokens=10", "--log_every=1",
            "--lr=1e-3"]


def test_script_resume_and_evaluation(tok_ckpt, sft_ckpt, tmp_path, monkeypatch, capsys):
    args = script_args(tok_ckpt, sft_ckpt, tmp_path) + ["--steps=3", "--eval_n=2", "--eval_batch=8", "--ckpt_every=1"]
    code, first, err = run_main(monkeypatch, capsys, args + ["--stop_after=2"])
    assert code == 0, err
    assert "before: referring mIoU" in first and "stopping after 2 steps" in first
    code, second, err = run_main(monkeypatch, capsys, args + ["--resume=true", "--reward=iou", "--format_weight=0.5"])
    assert code == 0, err
    assert "resuming from step 2" in second and "step    3/3" in second and "after:  referring mIoU" in second
    for line in [x for x in first.splitlines() + second.splitlines() if x.startswith("step ")]:
        for key in ("reward", "std", "zero-std", "kl", "clip lo", "hi", "len", "trunc", "completions/s"):
            assert key in line
    m = json.load(open(tmp_path / "metrics.json"))
    keys = ("refer_miou", "refer_ciou", "nacc", "exact_match", "caption_attr_acc", "tokenizer_ceiling_miou")
    assert all(k in m["before"] and k in m["after"] for k in keys)
    for k in ("reward_first", "reward_last", "completions_per_s", "train_seconds"):
        assert isinstance(m[k], float) and m[k] >= 0
    assert len(json.load(open(tmp_path / "history.json"))) == 3
    # what the resume read (vlm.resume_dir): plain tensors and containers, loadable with weights_only=True
    state = torch.load(tmp_path / "model" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["stage"] == "grpo" and state["optimizer"]["state"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".old"))]


def test_grpo_keeps_frozen_what_sft_froze(tok_ckpt, sft_ckpt, tmp_path, monkeypatch, capsys):
    """sft.py freezes the tiny preset's pretrained tower, merger included, and says so in the
    checkpoint's stage config: GRPO must not train it either (nor may a later stage from GRPO's)."""
    from safetensors.torch import load_file
    init = tmp_path / "sft"
    shutil.copytree(sft_ckpt, init)
    write_json(str(init / "model" / vlm.STAGE_CONFIG), {"stage": "sft", "tower_frozen": True})
    out = tmp_path / "grpo"
    args = script_args(tok_ckpt, str(init), out) + ["--steps=2", "--eval_n=0", "--lr=1e-2"]
    code, _, err = run_main(monkeypatch, capsys, args)
    assert code == 0, err
    before, after = load_file(init / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    tower = [k for k in before if "visual." in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if "layers." in k and "visual." not in k)
    assert vlm.stage_config(str(out / "model"))["tower_frozen"] is True


def test_two_ranks_ddp_fsdp_parity_and_the_script(policy, tok_ckpt, sft_ckpt, tmp_path):
    """2 gloo ranks under torchrun, DDP then FSDP2, against one process: the same global rows
    (3 groups of 3, one group of equal rewards dropped before, micro-batches of 2, so one rank
    also runs a zero-weight micro-batch), dapo aggregation, beta > 0, mu = 2. Then the whole
    script on the two ranks with FSDP2: rollouts keep the ranks in step, rows are gathered, the
    sharded model is saved whole."""
    model, processor, prompts, images = policy
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    steps = []
    for seed in (0, 1):
        rows, R = fixed_rows(processor, 3, 3, seed)
        R[1] = 0.5
        adv, equal = grpo.advantages(R)
        steps.append([dict(r, adv=a) for r, a, e in zip(rows, adv.flatten().tolist(), equal.repeat_interleave(3)) if not e])
    assert len(steps[0]) == 6
    cfg = dict(grpo.DEFAULTS, loss_type="dapo", beta=0.1, num_iterations=2, micro_batch=2, lr=0.5, eps_high=0.28)
    script = script_args(tok_ckpt, sft_ckpt, tmp_path / "run") + ["--steps=2", "--eval_n=0", "--fsdp=true", "--beta=0"]
    setup = dict(cfg=cfg, prompts=prompts, images=images, steps=steps, script=script)
    torch.save(setup, tmp_path / "setup.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "ddp_grpo.py"), str(tmp_path)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    net, stats = ddp_grpo.train(str(tmp_path), setup)
    ref = {k: v.detach() for k, v in net.state_dict().items()}
    start = vlm.load_model(str(tmp_path / "model"), cfg)[0].state_dict()
    assert any(not torch.equal(ref[k], start[k]) for k in ref)        # the update did move the weights
    for name in ("ddp", "fsdp"):
        got = torch.load(tmp_path / f"{name}.pt")
        assert got["weights"].keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got["weights"][k], ref[k], atol=1e-5), (name, k)
        assert torch.allclose(got["stats"], stats, rtol=1e-4, atol=1e-6), (name, got["stats"], stats)
    assert stats[:, 2].sum() + stats[:, 1].sum() > 0       # mu = 2 moved the ratio: the clip did bite
    assert "step    2/2" in p.stdout and "8 completions a step" in p.stdout
    assert torch.load(tmp_path / "run" / "model" / "train_state.pt", weights_only=True)["step"] == 2


def test_scale_rewards_takes_the_word_none():
    """--scale_rewards=none (Dr. GRPO) gets through the configurator, which reads the word none as
    None for an optional path, and an unknown value is one clear line."""
    from common import UserError, configure
    cfg = configure(grpo.DEFAULTS, grpo.PRESETS, ["--scale_rewards=none"])
    grpo.check_options(cfg, 1)
    assert cfg["scale_rewards"] == "none"
    with pytest.raises(UserError, match="choose group or none"):
        grpo.check_options(configure(grpo.DEFAULTS, grpo.PRESETS, ["--scale_rewards=batch"]), 1)


def test_script_bad_input(tok_ckpt, sft_ckpt, tmp_path, monkeypatch, capsys):
    """One clear line, exit 2, nothing written; a checkpoint already in out_dir stays as it was."""
    good = script_args(tok_ckpt, sft_ckpt, tmp_path / "out") + ["--steps=1", "--eval_n=0"]
    code, _, err = run_main(monkeypatch, capsys, good)
    assert code == 0, err
    saved = open(tmp_path / "out" / "model" / "model.safetensors", "rb").read()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "annotations.jsonl").write_text("")
    cases = [
        ([f"--init_from={tmp_path / 'nothing'}"], "no Stage-2 checkpoint"),
        ([f"--init_from={tok_ckpt}"], "Stage-1 tokenizer checkpoint"),
        ([f"--init_from={os.path.dirname(tok_ckpt)}"], "Stage-1 tokenizer checkpoint"),
        (["--batch_size=10"], "not a multiple of --num_generations=4"),
        (["--num_generations=1", "--batch_size=8"], "needs G >= 2"),
        (["--num_generations=0"], "needs G >= 2"),                    # no division by zero on the way
        (["--reward=pixels"], "--reward='pixels'"),
        ([f"--data={empty}"], "no usable scene"),
        ([f"--data={tmp_path / 'missing'}"], "--data="),
        (["--max_new_tokens=1"], "never ends its answer"),         # no answer fits in one token
        (["--resume=true", f"--out_dir={tmp_path / 'fresh'}"], "no checkpoint in"),
    ]
    for extra, msg in cases:
        code, _, err = run_main(monkeypatch, capsys, good + extra)
        assert code == 2 and msg in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    assert open(tmp_path / "out" / "model" / "model.safetensors", "rb").read() == saved
    assert not (tmp_path / "fresh").exists() or not os.listdir(tmp_path / "fresh")


def test_folder_dataset_without_referring_expressions_has_no_usable_prompts(tok_ckpt, sft_ckpt, tmp_path, monkeypatch,
                                                                            capsys):
    """A data/jsonl.py folder whose images have masks but no referring expressions: no prompts, one
    line, streamed or in memory. The same folder with its expressions trains."""
    from data import write_folder
    write_folder(str(tmp_path / "d"), "val", 6)
    lines = [json.loads(x) for x in open(tmp_path / "d" / "annotations.jsonl")]
    with open(tmp_path / "d" / "annotations.jsonl", "w") as f:
        for rec in lines:
            f.write(json.dumps(dict(rec, refs=[])) + "\n")
    args = script_args(tok_ckpt, sft_ckpt, tmp_path / "o") + ["--steps=1", "--eval_n=0", f"--data={tmp_path / 'd'}"]
    code, _, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "no usable samples" in err and len(err.strip().splitlines()) == 1, err   # streamed
    code, _, err = run_main(monkeypatch, capsys, args + ["--stream=false"])
    assert code == 2 and "no usable prompts" in err and len(err.strip().splitlines()) == 1, err   # in memory
    write_folder(str(tmp_path / "d"), "val", 6)
    code, out, err = run_main(monkeypatch, capsys, args)
    assert code == 0 and "step    1/1" in out, err


def test_streamed_folder_of_nonsquare_images_resumes_where_it_stopped(tok_ckpt, sft_ckpt, tmp_path, monkeypatch, capsys):
    """--data=FOLDER streams its prompts (vlm.prompt_batches: each step's prompts come with their own
    images, non-square JPEGs from 160 x 120 to 640 x 480, the iou reward decoding over each one); an interrupted
    and resumed run gives the step lines of the whole run."""
    from test_common import write_nonsquare_folder
    from data.coco import split_of
    names = [n for n in (f"images/ns_{i}.jpg" for i in range(200)) if split_of(n) == "train"][:12]   # JPEG
    folder = write_nonsquare_folder(str(tmp_path / "data"), names, [(120, 160), (480, 640), (178, 142), (96, 160)] * 3)
    args = lambda out: script_args(tok_ckpt, sft_ckpt, out) + [f"--data={folder}", "--n_train=0", "--steps=3",
                                                             "--eval_n=0", "--ckpt_every=1", "--pool_scenes=4",
                                                             "--reward=iou"]
    code, whole, err = run_main(monkeypatch, capsys, args(tmp_path / "whole"))
    assert code == 0 and "prompts: streamed" in whole, err
    code, first, err = run_main(monkeypatch, capsys, args(tmp_path / "cut") + ["--stop_after=2"])
    assert code == 0, err
    code, rest, err = run_main(monkeypatch, capsys, args(tmp_path / "cut") + ["--resume=true"])
    assert code == 0 and "resuming from step 2" in rest, err
    steps = lambda out: [line.split(" | lr")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps(first) + steps(rest) == steps(whole) and len(steps(whole)) == 3
