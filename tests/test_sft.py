"""SFT (Stage 2): vocabulary surgery, label masking, length limits, learning, DDP / FSDP2 parity."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sft  # noqa: E402
import tiny_vlm  # noqa: E402
import vlm  # noqa: E402
from conftest import TINY, build  # noqa: E402  (the fixtures tok_ckpt and world live in conftest.py too)
from data.tasks import NO_TARGET, absent_refs, conversations  # noqa: E402
from samtok import MASK_START, codes_to_text, load_tokenizer, mask_tokens, text_to_codes  # noqa: E402


def fake_batch(processor, model, n=3):
    ids = torch.randint(0, len(processor.tokenizer), (n, 12))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


# ---------------------------------------------------------------- vocabulary surgery
@pytest.mark.parametrize("vocab_pad, tie", [(1024, False), (2048, True)])
def test_vocabulary_surgery(world, tmp_path, vocab_pad, tie):
    """Padded matrices (rows > tokenizer length): nothing shrinks, every new row is initialised
    (inside the old padding too), old rows are untouched, ids round-trip, save -> load is exact."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model, processor = build(world[3], vocab_pad=vocab_pad, tie_embeddings=tie)
    old_len, old_rows = len(processor.tokenizer), model.get_input_embeddings().weight.shape[0]
    assert old_rows > old_len
    with torch.no_grad():  # padding rows get a sentinel value: "leftover padding" must not survive
        model.get_input_embeddings().weight[old_len:] = 7.0
        model.get_output_embeddings().weight[old_len:] = 7.0
    emb_before = model.get_input_embeddings().weight[:old_len].clone()
    head_before = model.get_output_embeddings().weight[:old_len].clone()
    ids = sft.add_mask_tokens(model, processor)
    tok = processor.tokenizer
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert len(ids) == 514 and ids == list(range(old_len, old_len + 514))
    assert emb.shape[0] == head.shape[0] == max(old_rows, len(tok)) >= old_rows          # never shrinks
    assert (emb.data_ptr() == head.data_ptr()) == tie
    assert torch.equal(emb[:old_len], emb_before) and torch.equal(head[:old_len], head_before)
    for W, before in ((emb, emb_before), (head, head_before)):
        new = W[ids]
        assert not (new == 7.0).any() and not (new == 0).all(1).any()
        mean, std = before.mean(0), before.std(0)
        assert ((new - mean).abs() <= 0.02 * 6 * std + 1e-6).all()      # mean + 0.02 N(0,1) std
        assert len(torch.unique(new, dim=0)) == 514                     # distinct rows
    if old_rows > len(tok):
        assert (emb[len(tok):] == 7.0).all()                            # padding past the words kept
    for w, i in zip(mask_tokens(), ids):
        assert tok.encode(w, add_special_tokens=False) == [i] and tok.decode([i]) == w
    text = "Segment " + codes_to_text([[12, 200], [0, 255]])
    assert text_to_codes(tok.decode(tok.encode(text, add_special_tokens=False))) == [(12, 200), (0, 255)]
    assert sft.add_mask_tokens(model, processor) == ids and torch.equal(model.get_input_embeddings().weight, emb)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert proc2.tokenizer.convert_tokens_to_ids(mask_tokens()) == ids
    assert not proc2.tokenizer.added_tokens_decoder[ids[5]].special
    images, samples = world[0], world[1]
    ss, _ = vlm.tokenize(conversations(samples, 3, 0)[:3], images, processor, 10 ** 9)
    batch, _ = vlm.collate(ss, images, processor)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)


def test_qwen3_vl_builds_and_takes_the_words(world):
    model, processor = build(world[3], model_type="qwen3_vl")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    ids = sft.add_mask_tokens(model, processor)
    ss, _ = vlm.tokenize(conversations(world[1], 3, 0)[:2], world[0], processor, 10 ** 9)
    batch, labels = vlm.collate(ss, world[0], processor)
    loss, hits = sft.token_loss(model, batch, labels, torch.tensor(ids[1:-1]))
    assert torch.isfinite(loss) and hits[1] > 0


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_token_loss_is_the_plain_loss_on_assistant_tokens(world, model_type):
    """token_loss runs the LM head on the labelled positions only: its summed loss and hits are
    those of the full logits, shifted by one, on every position whose next token has a label."""
    images, samples = world[0], world[1]
    model, processor = build(world[3], model_type=model_type)
    ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    ss, _ = vlm.tokenize(conversations(samples, 2, 0)[:4], images, processor, 10 ** 9)
    batch, labels = vlm.collate(ss, images, processor)
    with torch.no_grad():
        loss, hits = sft.token_loss(model, batch, labels, ids)
        full = model(**batch).logits[:, :-1]
    target = labels[:, 1:]
    plain = torch.nn.functional.cross_entropy(full.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(loss, plain, rtol=1e-5)
    words = torch.isin(target, ids)
    assert hits[1] == words.sum() > 0 and hits[0] == (full.argmax(-1) == target)[words].sum()


def test_soft_word_targets(world):
    """--word_soft: each code word's target keeps 1 - a on itself and spreads a over its own
    level's words, more to nearer codes; a = 0 is the plain loss, a > 0 changes only the code
    words' terms, into a cross-entropy against those distributions."""
    torch.manual_seed(0)
    codebook = torch.randn(2, 256, 8)
    Q = sft.word_targets(codebook, 0.5)
    assert torch.allclose(Q.sum(1), torch.ones(512)) and (Q.diagonal() >= 0.5).all()
    assert Q[:256, 256:].sum() == 0 and Q[256:, :256].sum() == 0               # levels never mix
    d = torch.cdist(codebook[1], codebook[1])[7]
    near, far = d.argsort()[1], d.argsort()[-1]
    assert Q[256 + 7, 256 + near] > Q[256 + 7, 256 + far] > 0
    images, samples = world[0], world[1]
    model, processor = build(world[3])
    ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    ss, _ = vlm.tokenize(conversations(samples, 2, 0)[:4], images, processor, 10 ** 9)
    batch, labels = vlm.collate(ss, images, processor)
    with torch.no_grad():
        # new rows start alike (one logit for every word, where soft and plain agree): make them differ
        head = model.get_output_embeddings().weight
        head[ids] += 0.5 * torch.randn(len(ids), head.shape[1])
        plain = sft.token_loss(model, batch, labels, ids)[0]
        assert torch.allclose(sft.token_loss(model, batch, labels, ids, sft.word_targets(codebook, 0.0))[0], plain)
        soft = sft.token_loss(model, batch, labels, ids, Q)[0]
        logp = model(**batch).logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    words, text = torch.isin(target, ids), (target != -100) & ~torch.isin(target, ids)
    w = (target[words][:, None] == ids).float().argmax(1)
    want = -logp[text].gather(1, target[text][:, None]).sum() - (Q[w] * logp[words][:, ids]).sum()
    assert words.sum() > 0 and torch.allclose(soft, want, rtol=1e-5) and not torch.allclose(soft, plain)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_cached_visual_tokens_give_the_pixels_logits(world, model_type):
    """A frozen tower's tokens, computed once (visual_tokens) and passed as mm_encoder_outputs,
    give the logits the pixels give; Qwen3-VL's DeepStack features come along."""
    images, samples = world[0], world[1]
    model, processor = build(world[3], model_type=model_type)
    sft.add_mask_tokens(model, processor)
    visual = vlm.visual_tokens(model, processor, images, torch.device("cpu"), batch=4)
    assert visual["tokens"].shape[0] == len(images) and bool(visual["deep"]) == (model_type == "qwen3_vl")
    convs = conversations(samples, 1, 0)
    ss, _ = vlm.tokenize([next(c for c in convs if c[0]["img"] == i) for i in (3, 0, 5, 3)], images, processor, 10 ** 9)
    with torch.no_grad():
        pixels = model(**vlm.collate(ss, images, processor)[0]).logits
        cached = model(**vlm.collate(ss, images, processor, visual=visual)[0]).logits
    assert torch.allclose(pixels, cached, atol=1e-5)


# ---------------------------------------------------------------- data
def test_labels_cover_exactly_the_assistant_tokens(world):
    """Conversations of 1 and 3 turns: ids identical to what the real processor makes of the
    rendered chat; the loss falls on the assistant's replies (+ <|im_end|>) and nothing else."""
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    sft.add_mask_tokens(model, processor)
    tok = processor.tokenizer
    picked = [next(s for s in samples if s["task"] == t) for t in ("refer", "caption", "gcg")]
    picked.append(next(s for s in samples if s["task"] == "refer" and s["kind"] == "none"))
    three = [s for s in samples if s["img"] == 1][:3]
    convs, dropped = vlm.tokenize([[s] for s in picked] + [three], images, processor, 10 ** 9)
    assert dropped == 0
    batch, labels = vlm.collate(convs, images, processor)
    for k, c in enumerate(convs):
        msgs = []
        for j, t in enumerate(c["turns"]):
            msgs.append({"role": "user", "content": ([{"type": "image"}] if j == 0 else []) + [{"type": "text", "text": t["prompt"]}]})
            msgs.append({"role": "assistant", "content": t["answer"]})
        text = processor.apply_chat_template(msgs, tokenize=False).rstrip("\n")
        ref = processor(text=[text], images=[images[c["img"]]], return_tensors="pt")
        n = ref["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][k, :n], ref["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][k, :n], ref["mm_token_type_ids"][0].long())
        on = labels[k] != -100
        assert tok.decode(labels[k][on]) == "".join(t["answer"] + "<|im_end|>" for t in c["turns"])
        assert not on[n:].any() and on.nonzero().min() == c["n_prompt"]
        # each labelled run is exactly one reply: it starts right after "<|im_start|>assistant\n"
        starts = [i for i in range(n) if on[i] and not on[i - 1]]
        assert len(starts) == len(c["turns"])
        for i in starts:
            assert tok.decode(batch["input_ids"][k, i - 3:i]) == "<|im_start|>assistant\n"
        assert not on[batch["input_ids"][k] == processor.image_token_id].any()
    n_pix = sum(int(g.prod()) for g in batch["image_grid_thw"])
    assert batch["pixel_values"].shape[0] == n_pix and len(batch["image_grid_thw"]) == len(convs)
    assert picked[0]["answer"].startswith(MASK_START) and picked[3]["answer"] == NO_TARGET
    assert "<|object_ref_start|>" in picked[2]["answer"] and text_to_codes(picked[2]["answer"])


def test_targets_sorted_by_box_centre(world):
    images, samples, scenes, cfg = world
    multi = [s for s in samples if s["task"] == "refer" and len(s["targets"]) > 1]
    assert multi
    for s in multi:
        box = scenes[s["img"]][1]["boxes"][s["targets"]]
        cx = (box[:, 0] + box[:, 2]) / 2
        assert (np.diff(cx) >= 0).all()
        assert len(text_to_codes(s["answer"])) == len(s["targets"])


def test_long_sample_dropped_and_counted_never_cut(world):
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    convs = conversations(samples, 4, 0)
    full, _ = vlm.tokenize(convs, images, processor, 10 ** 9)
    lengths = np.array([len(c["ids"]) for c in full])
    limit = int(np.median(lengths))
    kept, dropped = vlm.tokenize(convs, images, processor, limit)
    assert dropped == (lengths > limit).sum() > 0 and len(kept) + dropped == len(convs)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for c in kept:   # every kept conversation whole: all its image tokens, every reply to <|im_end|>
        assert len(c["ids"]) <= limit and c["ids"][-1] == end and c["in_loss"][-1]
        assert sum(i == processor.image_token_id for i in c["ids"]) == 16
        assert sum(i == end and lab for i, lab in zip(c["ids"], c["in_loss"])) == len(c["turns"])


def test_absent_refs_name_nothing_in_the_scene():
    """The extra no-target phrases of a training scene match none of its objects, repeat no
    phrase it already has, and come only for scenes with colour and shape attributes."""
    from data import iter_scenes, matches
    for seed, scene in iter_scenes("train", 20):
        extra = absent_refs(seed, scene, 3)
        assert len(extra) == 3 and all(r["targets"] == [] and r["kind"] == "none" for r in extra)
        assert not any(matches(o, r["attrs"]) for r in extra for o in scene["objects"])
        texts = [r["text"] for r in scene["refs"] + extra]
        assert len(texts) == len(set(texts))
    coco_like = dict(scene, objects=[{"category": "cat"}])
    assert absent_refs(seed, coco_like, 3) == []


def test_conversations_keep_one_image_and_one_task(world):
    """Several turns share one image and one task, so no reply can be copied from an earlier turn
    (a region caption's prompt or a grounded description holds the very words a referring answer
    needs) and referring turns have disjoint targets; every sample lands in exactly one conversation."""
    samples = world[1]
    convs = conversations(samples, 4, 0)
    assert all(len({(t["img"], t["task"]) for t in c}) == 1 and 1 <= len(c) <= 4 for c in convs)
    assert sorted(id(t) for c in convs for t in c) == sorted(id(s) for s in samples)
    assert len({c[0]["task"] for c in convs}) == 3
    for c in convs:                     # no target is answered twice in one conversation
        targets = [i for t in c for i in t.get("targets", ())]
        assert len(targets) == len(set(targets))
    assert any(len(c) > 1 and c[0]["task"] == "refer" for c in convs)
    # a task's share of an epoch: each referring sample dealt twice, the same rules in every copy
    again = conversations(samples, 4, 0, {"refer": 2})
    dealt = Counter(id(t) for c in again for t in c)
    assert all(dealt[id(s)] == (2 if s["task"] == "refer" else 1) for s in samples) and len(dealt) == len(samples)
    for c in again:
        targets = [i for t in c for i in t.get("targets", ())]
        assert len({(t["img"], t["task"]) for t in c}) == 1 and len(targets) == len(set(targets))
    assert conversations(samples, 4, 0, {"refer": 1}) == convs


def test_length_buckets_pad_little(world):
    images, samples, scenes, cfg = world
    lengths = [len(s) for s in ["x" * n for n in np.random.default_rng(0).integers(20, 120, 3000)]]
    stream = vlm.micro_batches(lengths, 16, 0, 64)
    pad = tot = 0
    seen = []
    for _ in range(3000 // 16):
        mb = next(stream)
        seen += mb
        L = [lengths[j] for j in mb]
        pad, tot = pad + sum(max(L) - x for x in L), tot + max(L) * len(L)
    assert pad / tot < 0.05
    assert len(set(seen)) == len(seen)   # an epoch visits every sample once


# ---------------------------------------------------------------- learning
def test_sft_steps_lower_the_loss(world):
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    ids = sft.add_mask_tokens(model, processor)
    ss, _ = vlm.tokenize(conversations(samples, 4, 0)[:4], images, processor, 10 ** 9)
    batch, labels = vlm.collate(ss, images, processor)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = sft.token_loss(model, batch, labels, torch.tensor(ids[1:-1]))
        loss = loss / (labels[:, 1:] != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients(world):
    images, samples, scenes, cfg = world
    model, processor = build(cfg)
    ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    ss, _ = vlm.tokenize(conversations(samples, 4, 0)[:2], images, processor, 10 ** 9)
    batch, labels = vlm.collate(ss, images, processor)
    model.train()
    grads = []
    for ckpt in (False, True):
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        sft.token_loss(model, batch, labels, ids)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the script: DDP, FSDP2, resume, evaluation
def run(args, nproc=0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc else [])
    return subprocess.Popen(launch + [os.path.join(ROOT, "sft.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p):
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    return out


def losses_of(out):
    return [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model", "model.safetensors"))


def test_script_ddp_fsdp_resume_eval(world, tok_ckpt, tmp_path):
    """A config-built model saved as a 'base model' folder; from it, the same global batch of
    2 x 4 conversations a step in three ways: one process (grad_accum=2) interrupted after 2 of 3
    steps and resumed, DDP on 2 processes, FSDP2 on 2 processes. All three give the same losses
    and the same final weights; the resumed run then evaluates and writes metrics + gallery."""
    from transformers import AutoProcessor
    base = str(tmp_path / "base")
    model, processor = build(world[3])
    model.save_pretrained(base)
    processor.save_pretrained(base)
    common = [f"--tokenizer_ckpt={tok_ckpt}", f"--base_model={base}", "--n_train=6", "--steps=3",
              "--batch_size=4", "--log_every=1", "--lr=3e-3", "--turns=4"]
    o = {k: str(tmp_path / k) for k in ("one", "ddp", "fsdp")}
    jobs = [run(common + [f"--out_dir={o['ddp']}", "--eval_n=0"], nproc=2),
            run(common + [f"--out_dir={o['fsdp']}", "--eval_n=0", "--fsdp=true"], nproc=2)]
    single = common + [f"--out_dir={o['one']}", "--grad_accum=2"]
    first = finish(run(single + ["--eval_n=0", "--stop_after=2", "--ckpt_every=1"]))
    second = finish(run(single + ["--eval_n=2", "--eval_batch=8", "--resume=true"]))
    ddp, fsdp = finish(jobs[0]), finish(jobs[1])

    assert "stopping after 2 steps" in first and "resuming from step 2" in second
    # the resumed run read train_state.pt with weights_only=True (vlm.resume_dir): plain tensors and containers
    state = torch.load(os.path.join(o["one"], "model", "train_state.pt"), weights_only=True)
    assert state["step"] == 3 and state["config"]["stage"] == "sft" and state["optimizer"]["state"]
    ref = losses_of(first) + losses_of(second)
    assert len(ref) == 3 and ref[-1] < ref[0]
    assert np.allclose(losses_of(ddp), ref, atol=2e-4), (losses_of(ddp), ref)
    assert np.allclose(losses_of(fsdp), ref, atol=2e-4), (losses_of(fsdp), ref)
    w1 = weights(o["one"])
    for other in ("ddp", "fsdp"):
        w2 = weights(o[other])
        assert w1.keys() == w2.keys()
        assert all(torch.allclose(w1[k], w2[k], atol=2e-5) for k in w1), other

    metrics = json.load(open(os.path.join(o["one"], "metrics.json")))
    for key in ("refer_miou", "refer_ciou", "nacc", "exact_match", "caption_attr_acc", "tokenizer_ceiling_miou",
                "padding_fraction", "train_seconds", "refer_level1_exact", "refer_miou_single_given_level1"):
        assert key in metrics
    assert 0 <= metrics["refer_miou"] <= 1 and 0 <= metrics["tokenizer_ceiling_miou"] <= 1
    assert os.path.exists(os.path.join(o["one"], "gallery.png"))
    saved = AutoProcessor.from_pretrained(os.path.join(o["one"], "model"))
    assert len(saved.tokenizer) == len(processor.tokenizer) + 514
    assert not [f for f in os.listdir(o["one"]) if f.endswith((".tmp", ".old"))]


def test_codes_pass_on_two_ranks_equals_one_process(tok_ckpt, tmp_path):
    """sft.py --encode_only=true: under torchrun each rank encodes its share of the scenes and the
    codes are gathered; 2 gloo ranks write the cache one process writes, and a second pass reads it."""
    common = [f"--tokenizer_ckpt={tok_ckpt}", "--n_train=5", "--eval_n=3", "--encode_only=true"]
    outs = {n: finish(run(common + [f"--out_dir={tmp_path / str(n) / 'sft'}"], nproc=n if n > 1 else 0)) for n in (1, 2)}
    assert "on 2 ranks" in outs[2] and "on 1 rank " in outs[1] and not (tmp_path / "1" / "sft" / "model").exists()
    caches = {n: sorted((tmp_path / str(n) / "codes").iterdir()) for n in (1, 2)}
    assert [f.name for f in caches[1]] == [f.name for f in caches[2]] and len(caches[1]) == 2     # train and test
    for a, b in zip(caches[1], caches[2]):
        ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert len(ca["keys"]) in (5, 3) and all(torch.equal(ca[k], cb[k]) for k in ("keys", "start", "codes"))
    mask_tok = load_tokenizer(tok_ckpt)
    from data import open_dataset
    scenes = [s for _, s in zip(range(5), open_dataset("shapes", split="train"))]
    train = next(t for t in (torch.load(f, weights_only=True) for f in caches[1]) if len(t["keys"]) == 5)
    assert train["keys"].tolist() == list(range(5))          # item k of the split, whichever rank read it
    assert all(torch.equal(vlm.codes_of(train, k).long(), mask_tok.encode(s["image"], s["masks"])) for k, s in enumerate(scenes))
    again = finish(run(common + [f"--out_dir={tmp_path / '2' / 'grpo'}"], nproc=2))   # another stage's out_dir, same cache
    assert "encoded" not in again


def test_script_config_built_frozen_tower_ddp_fsdp(tok_ckpt, tmp_path):
    """The default path: a config-built model whose pretrained tower is frozen, so its visual
    tokens are computed once and passed as mm_encoder_outputs (the tower never runs in a step);
    one process, DDP and FSDP2 on 2 processes give the same losses for the same global batch."""
    common = [*TINY, f"--tokenizer_ckpt={tok_ckpt}", "--n_train=6", "--steps=2", "--batch_size=4", "--log_every=1",
              "--eval_n=0"]
    ddp = run(common + [f"--out_dir={tmp_path / 'ddp'}"], nproc=2)
    fsdp = run(common + [f"--out_dir={tmp_path / 'fsdp'}", "--fsdp=true"], nproc=2)
    one = finish(run(common + [f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"]))
    ddp, fsdp = finish(ddp), finish(fsdp)
    assert "vision pretraining 2/2" in one
    assert len(losses_of(one)) == 2
    # grpo.py reads this to keep the tower frozen too
    stage = vlm.stage_config(str(tmp_path / "one" / "model"))
    assert stage["stage"] == "sft" and stage["tower_frozen"] is True
    assert np.allclose(losses_of(ddp), losses_of(one), atol=2e-4)
    assert np.allclose(losses_of(fsdp), losses_of(one), atol=2e-4)


def test_script_bad_input(tmp_path):
    p = finish_bad(run(["--no_such_option=1"]))
    assert "unknown option --no_such_option" in p
    p = finish_bad(run(["--word_soft=1.5"]))
    assert "--word_soft is the share" in p
    p = finish_bad(run(["--refer_repeat=0"]))
    assert "--refer_repeat is how many times" in p
    p = finish_bad(run([f"--tokenizer_ckpt={tmp_path / 'missing.pt'}", f"--out_dir={tmp_path}"]))
    assert "no tokenizer checkpoint" in p and "tokenizer.py" in p


def finish_bad(p):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err
    return err


def test_final_evaluation_reports_metrics_a_dataset_cannot_give(tmp_path, monkeypatch, capsys):
    """A dataset without no-target phrases or captions (COCO, RefCOCO, a plain folder) has no N-acc
    and no caption score: vlm.evaluate says None, and the final report must still be written and printed."""
    metrics = dict(refer_miou=0.5, refer_ciou=0.4, tokenizer_ceiling_miou=0.8, nacc=None, exact_match=0.1,
                   caption_attr_acc=None, refer_right_object=0.6, refer_right_object_tiny=None, refer_right_object_big=0.7,
                   refer_level1_exact=0.25)
    monkeypatch.setattr(sft, "load_pretrained", lambda path, cfg: (torch.nn.Linear(2, 2), None))
    monkeypatch.setattr(sft, "evaluate", lambda *a, **k: dict(metrics))
    cfg = dict(sft.DEFAULTS, out_dir=str(tmp_path), preset="tiny")
    sft.final_evaluation(cfg, None, torch.device("cpu"), 0.01, 0, 1.0)
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["nacc"] is None and saved["refer_miou_over_ceiling"] == pytest.approx(0.625)
    out = capsys.readouterr().out
    assert "test: referring mIoU 0.5000" in out and "right object 0.600 (tiny -, big 0.700) | level-1 word 0.250" in out


# ---------------------------------------------------------------- config-built model: word rows and vision pretraining
def test_codebook_word_init_keeps_the_codebook_geometry(world):
    """word_init=codebook: each level's 256 rows are one affine image of its codebook (so codes
    that are close, masks alike, get rows that are close), at the text rows' spread."""
    _, _, _, cfg = world
    model, processor = build(cfg)
    ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    cb = torch.randn(2, 256, 32)
    tiny_vlm.init_words_from_codebook(model, ids, cb)
    W = model.get_input_embeddings().weight.detach()
    for level in range(2):
        rows = W[ids[256 * level:256 * (level + 1)]]
        X = torch.cat([cb[level], torch.ones(256, 1)], 1)                  # rows = X @ A exactly
        fit = X @ torch.linalg.lstsq(X, rows).solution
        assert (fit - rows).norm() < 1e-4 * rows.norm()
        assert not torch.allclose(rows, W[ids[256 * (1 - level):256 * (2 - level)]])   # levels differ
        assert abs(rows.std() / W[:int(ids.min())].std() - 1) < 0.1     # the text rows' spread


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_pretraining_lowers_its_loss(world, tok_ckpt, model_type):
    """pretrain_vision on six scenes, for both config-built families (their mergers differ): the
    dense loss falls, and only the vision tower changes."""
    images, _, scenes, cfg = world
    mask_tok = load_tokenizer(tok_ckpt)
    images, _, scenes, codes = vlm.load_world("train", 6, mask_tok, cfg, ("refer",), keep_masks=True)
    model, processor = build(cfg, model_type=model_type)
    text_before = model.get_input_embeddings().weight.clone()
    losses = []
    log = lambda line: losses.append(float(line.split("loss ")[1].split()[0]))
    tiny_vlm.pretrain_vision(model, processor, images, scenes, codes, mask_tok.rvq.codebook.float(),
                             dict(cfg, vision_pretrain_steps=60, vision_pretrain_batch=6), log=log)
    assert len(losses) == 1 and losses[0] < 3.0       # starts near ln(9) + ln(7) + 1 ~ 5.1
    assert torch.equal(model.get_input_embeddings().weight, text_before)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_patch_embedding_as_matmul_computes_the_same(world, model_type):
    """Inside tiny_vlm.patch_embed_as_matmul the tower gives the same tokens and the same
    gradients as with its Conv3d (both families: Qwen3-VL's has a bias, Qwen2.5-VL's none), and
    the module's own forward is back after the block."""
    images, _, _, cfg = world
    model, processor = build(cfg, model_type=model_type)
    vis = vlm.vision_tower(model)
    px = processor.image_processor(images=list(images[:3]), return_tensors="pt")

    def run():
        out = vis(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        out.pow(2).sum().backward()
        grad = vis.patch_embed.proj.weight.grad.clone()
        vis.zero_grad(set_to_none=True)
        return out.detach(), grad
    conv_out, conv_grad = run()
    with tiny_vlm.patch_embed_as_matmul(vis):
        mm_out, mm_grad = run()
    assert torch.allclose(conv_out, mm_out, atol=1e-5, rtol=1e-4)
    assert torch.allclose(conv_grad, mm_grad, atol=1e-5, rtol=1e-3)
    assert "forward" not in vars(vis.patch_embed)
    assert torch.equal(run()[0], conv_out)


def test_grounding_answers_are_boxes_in_qwens_format():
    """--tasks=...,ground: phrase -> <|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
    on Qwen2-VL's 0-1000 grid, one box a target (in the referring order), "No target." for none;
    the BPE corpus gets those texts only when the task is on."""
    import re
    from data import iter_scenes
    from data.tasks import box_text, scene_samples, text_corpus
    seeds_scenes = list(iter_scenes("train", 20))
    seen = set()
    for seed, s in seeds_scenes:
        H, W = s["image"].shape[:2]
        for x in scene_samples(seed, s, np.zeros((len(s["masks"]), 2), int), ("ground",)):
            boxes = re.findall(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>", x["answer"])
            assert len(boxes) == len(x["targets"]) and (boxes or x["answer"] == NO_TARGET)
            for (x1, y1, x2, y2), i in zip(boxes, x["targets"]):
                b = s["boxes"][i]
                assert abs(int(x1) - b[0] * 1000 / W) < 1 and abs(int(y2) - min(b[3] * 1000 / H, 999)) < 1
                assert x["phrase"] in x["answer"]
            seen.add(len(boxes))
    assert {0, 1} <= seen and max(seen) >= 2                   # no target, one, several
    scenes = [s for _, s in seeds_scenes]
    assert box_text(scenes[0]["boxes"][0], 128, 128) in text_corpus(scenes, ("refer", "ground"))
    assert not any("<|box_start|>" in t for t in text_corpus(scenes))


def test_streamed_folder_of_nonsquare_images_resumes_where_it_stopped(tok_ckpt, tmp_path):
    """--data=FOLDER streams (data/stream.py): the workers read, tokenize and batch non-square
    JPEGs from 160 x 120 to 640 x 480; an interrupted and resumed run trains on the batches of the whole run
    (the same step lines), and 2 ranks x 2 workers run through under torchrun."""
    from test_common import nonsquare_names, write_nonsquare_folder
    from data.coco import split_of
    names = [n for n in (f"images/ns_{i}.jpg" for i in range(200)) if split_of(n) == "train"][:18]   # JPEG
    folder = write_nonsquare_folder(str(tmp_path / "data"), names + nonsquare_names(2),
                                    [(120, 160), (480, 640), (178, 142), (96, 160)] * 5)
    common = [*TINY, f"--tokenizer_ckpt={tok_ckpt}", f"--data={folder}", "--n_train=0", "--steps=5", "--batch_size=4",
              "--pool_scenes=4", "--log_every=1", "--ckpt_every=2", "--eval_n=0"]
    whole = run(common + [f"--out_dir={tmp_path / 'whole'}"])
    two = run(common + [f"--out_dir={tmp_path / 'two'}", "--steps=2"], nproc=2)
    out = finish(run(common + [f"--out_dir={tmp_path / 'cut'}", "--stop_after=3"]))
    assert "streamed" in out and len(losses_of(out)) == 3
    again = finish(run(common + [f"--out_dir={tmp_path / 'cut'}", "--resume=true"]))
    assert "resuming from step 2" in again
    whole, two = losses_of(finish(whole)), finish(two)
    assert losses_of(out)[:2] + losses_of(again) == whole and len(whole) == 5
    assert "streamed" in two and len(losses_of(two)) == 2
