"""The trainer: resume equality, checkpoints, logs, and refusing bad input without leaving a run behind."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.engine.checkpoint import CheckpointError, read_checkpoint
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


def _cfg(tiny, *extra):
    return load_config(RECIPE, [*tiny, *extra])


def _weights(run_dir, which="last"):
    ckpt, _ = read_checkpoint(run_dir, prefer=which)
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("loss", ["triplet", "arcface"])
def test_resume_gives_identical_weights(tmp_path, tiny_overrides, loss):
    extra = [f"losses=[{{name: {loss}}}]", "scheduler.name=step", "scheduler.step_size=3",
             "optimizer.name=sgd", "optimizer.lr=0.05", "train.eval_every=3"]
    straight = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "a")
    straight.fit()
    first = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=3"), tmp_path / "b")
    first.fit()
    resumed = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = read_checkpoint(tmp_path / "a", "last")[1], read_checkpoint(tmp_path / "b", "last")[1]
    assert sa["step"] == sb["step"] == 6 and sa["position"] == sb["position"] and sa["epoch"] == sb["epoch"]


def test_run_directory_contents(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, "train.max_steps=4", "train.eval_every=2"), run).fit()
    assert (run / "config.yaml").is_file()
    assert load_config(run).train.max_steps == 4, "the resolved config is saved"
    for name in ("best", "last"):
        d = run / "checkpoints" / name
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "train_state.safetensors", "state.json", "config.yaml"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [0, 2, 4] and "recall@1" in evals[0]["eval"]
    assert {x["split"] for x in evals} == {"test"}, "no validation split: the test split is logged, step 0 untrained"
    assert {"source", "train", "val", "test"} <= set(json.loads((run / "splits.json").read_text()))
    assert all(np.isfinite(x["loss"]) and x["images_per_s"] > 0 for x in lines if "loss" in x)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_existing_run_is_not_overwritten(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_overrides, "train.max_steps=1"), run).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints; continue it with --resume"):
        Trainer(_cfg(tiny_overrides, "train.max_steps=1"), run)


def test_bad_input_leaves_no_run_directory(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    with pytest.raises(DataError, match="Fashion-MNIST root .*nowhere does not exist"):
        Trainer(_cfg(tiny_overrides, "data.format=fashion_mnist", "data.options={}", f"data.root={tmp_path / 'nowhere'}"), run).fit()
    with pytest.raises(ConfigError, match="losses.0.params: .*'marign'"):
        Trainer(_cfg(tiny_overrides, "losses=[{name: triplet, params: {marign: 0.1}}]"), run)
    with pytest.raises(ConfigError, match="data.options.train_clases: format 'digits' has no option"):
        Trainer(_cfg(tiny_overrides, "data.options={train_clases: [1]}"), run)
    assert not run.exists()


def test_missing_checkpoint_is_named(tmp_path, tiny_overrides):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing"):
        Trainer(_cfg(tiny_overrides), tmp_path / "nothing", resume=True)


def test_single_image_class_is_refused_by_name(tmp_path, tiny_overrides):
    from deepmetric.data.formats.arrays import digits

    splits = digits()
    keep = np.concatenate([np.flatnonzero(splits.train.labels != 4), np.flatnonzero(splits.train.labels == 4)[:1]])
    splits.train = splits.train.subset(keep)
    with pytest.raises(DataError, match="training class 4 has only one image"):
        Trainer(_cfg(tiny_overrides), tmp_path / "r", splits=splits)


# -- training switches: frozen BatchNorm, backbone warm-up, gradient value clipping, random batches ---

def _train_steps(trainer, n):
    """``n`` optimizer steps as ``fit`` runs them, without evaluation or checkpoints."""
    trainer.model.train()
    trainer.losses.train()
    batches = trainer._batches()
    for _ in range(n):
        images, labels = next(batches)[:2]
        trainer.train_step(images.to(trainer.device), labels.to(trainer.device))


def _clone(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("affine", [True, False])
def test_freeze_bn_keeps_backbone_statistics_and_affine(tmp_path, tiny_overrides, affine):
    t = Trainer(_cfg(tiny_overrides, "model.freeze_bn=true", f"model.freeze_bn_affine={str(affine).lower()}",
                     "optimizer.lr=0.01"), tmp_path / "run")
    bns = t.model.backbone_batchnorms()
    bn_params = {id(p) for bn in bns for p in bn.parameters()}
    in_optimizer = {id(p) for g in t.optimizers["main"].param_groups for p in g["params"]}
    assert bool(bn_params & in_optimizer) is not affine, "frozen affine parameters are left out of the optimizer"
    before = _clone(t.model)
    _train_steps(t, 3)
    after = t.model.state_dict()
    for name in before:
        is_bn = any(name.startswith(f"backbone.{n}.") for n, m in t.model.backbone.named_modules() if m in bns)
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(before[name], after[name]), f"{name}: running statistics must stay frozen"
        elif is_bn:
            assert torch.equal(before[name], after[name]) is affine, name
        elif name.endswith("weight"):
            assert not torch.equal(before[name], after[name]), f"{name} should train"


def test_backbone_warmup_freezes_the_backbone_bit_for_bit(tmp_path, tiny_overrides):
    # AdamW with weight decay and SGD with momentum: a frozen parameter must not drift either way
    for name, extra in (("adamw", []), ("sgd", ["optimizer.momentum=0.9"])):
        t = Trainer(_cfg(tiny_overrides, f"optimizer.name={name}", *extra, "optimizer.weight_decay=0.1",
                         "optimizer.lr=0.01", "train.freeze_backbone_steps=3", "losses=[{name: proxy_anchor}]"),
                    tmp_path / name)
        params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
        backbone, head, proxies = params(t.model.backbone), params(t.model.head), params(t.losses)
        _train_steps(t, 3)
        now = dict(t.model.backbone.named_parameters())
        assert all(torch.equal(v, now[k]) for k, v in backbone.items()), f"{name}: the backbone moved"
        assert not torch.equal(head["proj.weight"], t.model.head.proj.weight), "the head trains during the warm-up"
        assert not torch.equal(proxies["0.weight"], t.losses[0].weight), "the proxies train during the warm-up"
        _train_steps(t, 1)
        assert not torch.equal(backbone["body.0.weight"], now["body.0.weight"]), "then the backbone trains"


def test_resume_inside_the_warmup_with_random_batches(tmp_path, tiny_overrides):
    extra = ["data.sampler=random", "data.batch_size=12", "train.freeze_backbone_steps=4",
             "optimizer.name=sgd", "optimizer.lr=0.05", "train.eval_every=2"]
    straight = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "a")
    assert type(straight.sampler).__name__ == "RandomBatchSampler"
    straight.fit()
    Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=2"), tmp_path / "b").fit()
    first = _weights(tmp_path / "b")
    resumed = Trainer(_cfg(tiny_overrides, *extra, "train.max_steps=6"), tmp_path / "b", resume=True)
    assert resumed.step == 2
    resumed.fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(first["backbone.body.0.weight"], b["backbone.body.0.weight"])


def test_grad_clip_value_bounds_every_gradient_at_the_step(tmp_path, tiny_overrides):
    """Clipping sees true gradients: with a loss scaler (as fp16 uses), it runs after unscaling, so
    the largest entry at the optimizer step is the clip value itself, not value / scale."""
    value = 1e-3
    losses = "losses=[{name: proxy_anchor}, {name: center, weight: 0.01, optimizer: sgd, lr: 0.1}]"
    t = Trainer(_cfg(tiny_overrides, losses, f"train.grad_clip_value={value}"), tmp_path / "run")
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen = {}

    def record(key):
        def hook(opt, args, kwargs):
            grads = [p.grad.abs().max() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            seen.setdefault(key, []).append(float(torch.stack(grads).max()))
        return hook

    for key, opt in t.optimizers.items():
        opt.register_step_pre_hook(record(key))
    _train_steps(t, 2)
    assert set(seen) == {"main", "losses.1"}
    for key, maxima in seen.items():
        assert all(m == pytest.approx(value, rel=1e-6) for m in maxima), (key, maxima)


def test_random_sampler_keeps_single_image_classes(tmp_path, tiny_overrides):
    from deepmetric.data.formats.arrays import digits

    splits = digits()
    keep = np.concatenate([np.flatnonzero(splits.train.labels != 4), np.flatnonzero(splits.train.labels == 4)[:1]])
    splits.train = splits.train.subset(keep)
    t = Trainer(_cfg(tiny_overrides, "data.sampler=random"), tmp_path / "r", splits=splits)
    assert len(t.splits.train) == len(keep) and t.sampler.batch_size == 20  # 5 classes x 4


def test_sampler_settings_are_checked(tmp_path, tiny_overrides):
    with pytest.raises(ConfigError, match="data.batch_size=12 but data.sampler=pk draws .* = 20 images"):
        Trainer(_cfg(tiny_overrides, "data.batch_size=12"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"data.sampler=random: data.batch_size=100000 x 1 process\(es\)"):
        Trainer(_cfg(tiny_overrides, "data.sampler=random", "data.batch_size=100000"), tmp_path / "b")
    with pytest.raises(ConfigError, match="model.freeze_bn: backbone 'small_cnn' has no BatchNorm"):
        Trainer(_cfg(tiny_overrides, "model.freeze_bn=true", "model.backbone_options={width: 16, norm: group}"),
                tmp_path / "c")


def test_fp16_resume_restores_the_loss_scale(tmp_path, tiny_overrides):
    """fp16 with a GradScaler: the scale it reached (and its growth counter) survive --resume, so
    6 straight steps == 3 + resume + 3, bitwise. growth_interval is cut via a hook to make it move."""
    extra = ["train.amp=fp16", "train.channels_last=true", "optimizer.name=sgd", "optimizer.lr=0.05"]

    def trainer(steps, run, resume=False):
        t = Trainer(_cfg(tiny_overrides, *extra, f"train.max_steps={steps}"), run, resume=resume)
        t.scaler.set_growth_factor(2.0)
        t.scaler._growth_interval = 2  # grows every 2 clean steps: 65536 -> 2^17 at step 2, ...
        if resume:
            t._restore()  # the loaded state wins over the values set above
        return t

    straight = trainer(6, tmp_path / "a")
    straight.fit()
    first = trainer(3, tmp_path / "b")
    first.fit()
    resumed = trainer(6, tmp_path / "b", resume=True)
    assert resumed.scaler.get_scale() == first.scaler.get_scale() != 65536.0
    resumed.fit()
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tmp_path, tiny_overrides, amp):
    """Autocast runs the model in half precision; losses compute in fp32 (no overflow in the
    exponentials); a few steps land near the fp32 weights and the loss is finite throughout."""
    extra = ["optimizer.name=sgd", "optimizer.lr=0.05", "train.max_steps=3", "losses=[{name: multi_similarity}]"]
    full = Trainer(_cfg(tiny_overrides, *extra), tmp_path / "fp32")
    full.fit()
    half = Trainer(_cfg(tiny_overrides, *extra, f"train.amp={amp}", "train.channels_last=true"), tmp_path / amp)
    half.fit()
    assert all(np.isfinite(r["loss"]) for r in half.history if "loss" in r)
    a, b = _weights(tmp_path / "fp32"), _weights(tmp_path / amp)
    assert any(not torch.equal(a[k], b[k]) for k in a), "autocast really ran in half precision"
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=0.05, rtol=0.05), k


def test_compiled_training_matches_eager(tmp_path, tiny_overrides):
    """train.compile=true (torch.compile, inductor on CPU) trains the same model as eager mode."""
    extra = ["optimizer.name=sgd", "optimizer.lr=0.05", "train.max_steps=2"]
    Trainer(_cfg(tiny_overrides, *extra), tmp_path / "eager").fit()
    compiled = Trainer(_cfg(tiny_overrides, *extra, "train.compile=true"), tmp_path / "compiled")
    assert compiled.net is not compiled.model
    compiled.fit()
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k


def test_a_loss_terms_own_optimizer_keeps_its_lr(tmp_path, tiny_overrides):
    """Centroids-ReID: warm-up and steps act on the main optimizer; the centre loss's SGD keeps its lr."""
    losses = "losses=[{name: triplet}, {name: center, weight: 0.0005, optimizer: sgd, lr: 0.5}]"
    sched = ["scheduler.name=multistep", "scheduler.milestones=[2]", "scheduler.warmup_steps=2",
             "scheduler.warmup_factor=0.1", "optimizer.lr=0.01"]
    t = Trainer(_cfg(tiny_overrides, losses, *sched, "train.max_steps=4"), tmp_path / "run")
    lrs = {"main": [], "losses.1": []}
    for key, opt in t.optimizers.items():
        opt.register_step_pre_hook(lambda o, a, k, key=key: lrs[key].append(o.param_groups[0]["lr"]))
    t.fit()
    assert lrs["losses.1"] == [0.5] * 4
    assert lrs["main"][0] == pytest.approx(0.001) and lrs["main"][-1] == pytest.approx(0.001)
