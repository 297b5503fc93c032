"""fxprune.heal: distillation that lowers the KD loss, holds every mask, never touches the teacher,
computes the losses it claims, refuses bad input, and gives the same steps under FSDP2 on two
processes as on one."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 256


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # sharp logits: pruning moves them, so there is something to heal
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n=8, batch=4, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def pruned():
    dense = _llama()
    ids = torch.randint(0, VOCAB, (2, 16))
    res = fxprune.compile(dense, ids, heads=0.5, ffn=0.25, sparsity="2:4", uniform=True)
    return dense, res


def _masked_nonzero(module, masks) -> int:
    return sum(int(((module.get_parameter(k) != 0) & ~m).sum()) for k, m in masks.items())


def test_heal_lowers_kd_loss_holds_masks_and_leaves_the_teacher(pruned):
    dense, res0 = pruned
    res = copy.deepcopy(res0)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    batches = _batches()
    rep = fxprune.heal(res, dense, batches, steps=40, lr=3e-3, progress=False)
    assert rep.model is res.model and rep.steps == 40 and len(rep.history) == 40
    first, last = sum(rep.history[:5]) / 5, sum(rep.history[-5:]) / 5
    assert last < 0.6 * first, rep.history
    # every N:M mask held: the masked weights are exactly zero, none revived
    assert res.masks and _masked_nonzero(res.model, res.masks) == 0 and rep.revived == 0
    assert rep.masks_held == len(res.masks)
    assert rep.masked_weights == sum(int((~m).sum()) for m in res.masks.values())
    # the teacher: same weights, same mode, no gradients
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert not dense.training and all(p.grad is None for p in dense.parameters())
    assert not res.model.training  # the student's own flag comes back
    assert rep.tokens == 40 * 4 * 24
    # the plan records the healing (checkpoints and hand-off records carry it); the graph
    # module shares the healed weights
    assert res.plan.config["healed"] == [{"loss": "kd", "steps": 40, "tokens": 3840, "lr": 3e-3}]
    assert "healed" not in res0.plan.config
    for k, p in res.module.named_parameters():
        assert torch.equal(p, res.model.get_parameter(k)), k
    # the KD loss it reports is the loss of the healed model on those batches
    from fxprune.distill import batch_loss as _loss

    with torch.no_grad():
        now = sum(float(_loss(res.model, dense, b, "kd", 1.0)[0]) for b in batches) / len(batches)
    assert now < first


def test_without_the_masks_the_zeros_revive(pruned):
    """The mask check can fail: ``masks={}`` holds nothing, and training revives pruned weights."""
    dense, res0 = pruned
    res = copy.deepcopy(res0)
    rep = fxprune.heal(res.model, dense, _batches(), steps=5, lr=3e-3, masks={}, progress=False)
    assert rep.masks_held == 0
    assert _masked_nonzero(res.model, res.masks) > 1000


def test_a_plain_module_holds_the_zeros_of_its_pruned_weights(pruned):
    dense, res0 = pruned
    res = copy.deepcopy(res0)
    rep = fxprune.heal(res.model, dense, _batches(), steps=3, lr=3e-3, progress=False)
    assert rep.masks_held == len(res.masks)  # every 2:4 weight found by its zeros
    assert _masked_nonzero(res.model, res.masks) == 0


def test_losses_are_what_they_say(pruned):
    dense, res0 = pruned
    from fxprune.distill import batch_loss as _loss

    ids = _batches(1)[0]
    with torch.no_grad():
        lm, n = _loss(res0.model, None, ids, "lm", 1.0)
        assert n == ids.numel()
        torch.testing.assert_close(lm, res0.model(ids, labels=ids).loss)
        # KD of a model against itself is zero; against another model it is the mean KL
        same, _ = _loss(dense, dense, ids, "kd", 2.0)
        assert float(same) == pytest.approx(0.0, abs=1e-6)
        kd, _ = _loss(res0.model, dense, ids, "kd", 2.0)
        s = torch.log_softmax(res0.model(ids).logits / 2, -1)
        t = torch.log_softmax(dense(ids).logits / 2, -1)
        ref = (t.exp() * (t - s)).sum(-1).mean() * 4
        torch.testing.assert_close(kd, ref, rtol=1e-4, atol=1e-6)
        both, _ = _loss(res0.model, dense, ids, "kd+lm", 2.0)
        torch.testing.assert_close(both, kd + _loss(res0.model, dense, ids, "lm", 1.0)[0])
        # padding does not count
        mask = torch.ones_like(ids)
        mask[:, -8:] = 0
        padded, n = _loss(res0.model, dense, {"input_ids": ids, "attention_mask": mask}, "kd", 1.0)
        assert n == int(mask.sum())
        # right padding in a causal model: the real tokens' loss is the loss of the unpadded ids
        short, _ = _loss(res0.model, dense, ids[:, :-8], "kd", 1.0)
        torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-6)


def test_bad_input_is_refused(pruned):
    dense, res = pruned
    model = copy.deepcopy(res.model)
    b = _batches(2)
    cases = [
        (dict(teacher=None), "teacher"),
        (dict(teacher=model), "teacher is the model"),
        (dict(loss="lm"), "teacher=None"),
        (dict(max_grad_norm=0), "max_grad_norm="),
        (dict(max_grad_norm=-1.0), "max_grad_norm="),
        (dict(weight_decay=-0.1), "weight_decay="),
        (dict(warmup=2), "warmup="),
        (dict(eval_every=1), "eval_fn"),
        (dict(batches=5), "give a list or iterable"),
        (dict(batches=iter([])), "no batch"),
        (dict(loss="mse"), "loss="),
        (dict(steps=0), "steps="),
        (dict(lr=0), "lr="),
        (dict(grad_accum=0), "grad_accum="),
        (dict(schedule="step"), "schedule="),
        (dict(loss="lm", temperature=2.0), "temperature"),
        (dict(masks={"nope.weight": torch.ones(1, dtype=torch.bool)}), "not a parameter"),
        (dict(masks={"lm_head.weight": torch.ones(3, dtype=torch.bool)}), "does not fit"),
        (dict(batches=[]), "no batch"),
        (dict(batches=b[0]), "not one batch"),
        (dict(shard=True), "torch.distributed"),
    ]
    for kw, msg in cases:
        args = {"teacher": dense, "batches": b, "steps": 2, "lr": 1e-3, "progress": False} | kw
        teacher, batches = args.pop("teacher"), args.pop("batches")
        with pytest.raises(ConfigError, match=msg):
            fxprune.heal(model, teacher, batches, **args)
    with pytest.raises(ConfigError, match="nn.Module"):
        fxprune.heal("model", dense, b, steps=1, lr=1e-3)


def test_a_teacher_sharing_weights_with_the_student_is_refused(pruned):
    dense, res = pruned
    model = copy.deepcopy(res.model)
    teacher = copy.deepcopy(dense)
    teacher.lm_head.weight = model.lm_head.weight  # e.g. compile(..., inplace=True) on it
    with pytest.raises(ConfigError, match="shares 1 parameters"):
        fxprune.heal(model, teacher, _batches(2), steps=1, lr=1e-3, progress=False)


def test_an_iterator_that_runs_out_stops_and_says_so(pruned):
    dense, res = pruned
    model = copy.deepcopy(res.model)
    with pytest.warns(UserWarning, match="ran out"):
        rep = fxprune.heal(model, dense, iter(_batches(3)), steps=5, lr=1e-3, progress=False)
    assert rep.steps == 3 and len(rep.history) == 3  # three batches, three steps
    assert "ran out" in rep.notes[0]
    rep = fxprune.heal(
        model, dense, iter(_batches(4)), steps=2, lr=1e-3, grad_accum=2, progress=False
    )
    assert rep.steps == 2 and not rep.notes


def test_eval_fn_records_the_curve_and_grad_accum_matches_a_big_batch(pruned):
    dense, res = pruned
    a, b = copy.deepcopy(res.model), copy.deepcopy(res.model)
    big = _batches(2, batch=4)
    halves = [t for x in big for t in (x[:2], x[2:])]
    calls = []

    def ev(m):
        calls.append(m.training)
        return 1.0

    ra = fxprune.heal(
        a,
        dense,
        big,
        steps=2,
        lr=1e-3,
        eval_fn=ev,
        eval_every=1,
        progress=False,
        max_grad_norm=None,
    )
    rb = fxprune.heal(
        b, dense, halves, steps=2, lr=1e-3, grad_accum=2, progress=False, max_grad_norm=None
    )
    assert [s for s, _ in ra.evals] == [0, 1, 2] and not any(calls)
    torch.testing.assert_close(torch.tensor(ra.history), torch.tensor(rb.history))
    for (k, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)


def test_a_graph_module_heals(pruned):
    """result.module (a GraphModule whose weights are plain parameters, no Linear modules): its
    2:4 zeros are found and held, and its eval flag comes back."""
    dense, res0 = pruned
    res = copy.deepcopy(res0)
    rep = fxprune.heal(res.module, dense, _batches(), steps=3, lr=3e-3, progress=False)
    assert rep.steps == 3 and _masked_nonzero(res.module, res.masks) == 0
    assert rep.masks_held == len(res.masks)
    assert not res.module.training


_FSDP = r"""
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
import fxprune
from tests.test_heal import _llama, _batches, VOCAB

world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
dense = _llama()
ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
res = fxprune.compile(dense, ids, heads=0.5, ffn=0.25, sparsity="2:4", uniform=True)
share = [b[rank * 4 // world:(rank + 1) * 4 // world] for b in _batches(3, batch=4)]
rep = fxprune.heal(res.model, dense, share, masks=res.masks, steps=3, lr=3e-3, progress=False)
sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in res.model.state_dict().items()}
zeros = {k: int((sd[k] == 0).sum()) for k in res.masks}
held = all(int((sd[k] != 0)[~m].sum()) == 0 for k, m in res.masks.items())
if rank == 0:
    torch.save(sd, sys.argv[1] + f".w{world}.pt")
    print(json.dumps({"history": rep.history, "sharded": rep.sharded, "zeros": zeros,
                      "held": held, "tokens": rep.tokens}))
if world > 1:
    dist.destroy_process_group()
"""


def _run(tmp_path, cmd):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def test_fsdp2_two_processes_equal_one(tmp_path):
    """torchrun, 2 processes on gloo (CPU), each with half of every batch: the same loss per step
    as one process on the whole batches, the same masks held, the same weights."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "heal_fsdp.py"
    script.write_text(_FSDP)
    base = str(tmp_path / "w")
    one = _run(tmp_path, [sys.executable, str(script), base])
    two = _run(
        tmp_path,
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(script),
            base,
        ],
    )
    assert not one["sharded"] and two["sharded"]
    assert one["held"] and two["held"] and one["zeros"] == two["zeros"]
    assert one["tokens"] == two["tokens"]
    torch.testing.assert_close(
        torch.tensor(two["history"]), torch.tensor(one["history"]), rtol=1e-4, atol=1e-6
    )
    assert one["history"][0] > one["history"][-1]
    w1, w2 = torch.load(base + ".w1.pt"), torch.load(base + ".w2.pt")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_iterative_prune_heals_between_steps():
    dense = _llama()
    ids = torch.randint(0, VOCAB, (2, 16))
    batches = _batches(4)
    out = fxprune.iterative_prune(
        dense,
        ids,
        steps=2,
        ffn=0.5,
        sparsity="2:4",
        heal={"batches": batches, "steps": 5, "lr": 3e-3, "progress": False},
    )
    for s in out.steps:
        assert s.heal is not None and s.heal.steps == 5 and s.heal.revived == 0
        assert s.heal.masks_held == len(s.masks)
    with pytest.raises(ConfigError, match="heal"):
        fxprune.iterative_prune(dense, ids, steps=2, ffn=0.5, heal={"steps": 5, "lr": 1e-3})
    with pytest.raises(ConfigError, match="not fxprune.heal arguments"):
        fxprune.iterative_prune(
            dense,
            ids,
            steps=2,
            ffn=0.5,
            heal={"batches": batches, "steps": 5, "lr": 1e-3, "step": 1},
        )
