"""LR schedules and gradient clipping by value equal SimpleTuner's documented formulas.

The references below are written from SimpleTuner's behaviour (helpers/training/custom_schedule.py and trainer.py,
read, not copied): its `cosine` and `sine` classes truncate each rate with floor(rate * 1e9) / 1e9; `cosine` is built
with steps_per_epoch -1, so its T_cur is k // -1 + (k % -1) / -1 = -k (it never restarts, it oscillates); its
`cosine_with_restarts` computes T_cur = k % -1 = 0 at every step (the base rate, always); `polynomial` is its own
copy of the BERT formula; everything else goes to diffusers' get_scheduler. Tolerance: 1e-9 relative.
"""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
import yaml
from helpers import make_project
from mlflow import MlflowClient

from flux2lora.config import TrainParams
from flux2lora.stages import run_stage
from flux2lora.train.schedules import build_lr_scheduler

LR, LR_END, WARMUP, TOTAL = 1e-4, 4e-7, 100, 1000
STEPS = [0, 1, 2, 25, 49, 50, 51, 99, 100, 101, 150, 199, 200, 250, 333, 499, 500, 501, 750, 900, 999, 1000, 1001]


def floor_1e9(rate: float) -> float:
    return math.floor(rate * 1e9) / 1e9


def simpletuner_rate(name: str, k: int, lr=LR, lr_end=LR_END, warmup=WARMUP, total=TOTAL, power=0.8) -> float:
    """SimpleTuner's learning rate after k scheduler steps (one per optimizer step, one process)."""
    if name == "cosine":  # class Cosine(T_0=warmup, eta_min=lr_end), steps_per_epoch -1
        t_cur = (k // -1) + (k % -1) / -1
        return floor_1e9(lr_end + (lr - lr_end) * (1 + math.cos(math.pi * t_cur / warmup)) / 2)
    if name == "sine":  # class Sine(T_0=warmup, eta_min=lr_end): a continuous wave over the total step count
        return floor_1e9(lr_end + (lr - lr_end) * (0.5 * (1 + math.sin(math.pi * k / warmup))))
    if name == "cosine_with_restarts":  # class CosineAnnealingHardRestarts: T_cur = k % -1 == 0
        t_cur = k % -1
        return floor_1e9(lr_end + (lr - lr_end) * (1 + math.cos(math.pi * t_cur / warmup)) / 2)
    if name == "polynomial":  # its get_polynomial_decay_schedule_with_warmup(lr_end, power=lr_power)
        if k < warmup:
            return lr * k / max(1, warmup)
        if k > total:
            return lr_end
        return (lr - lr_end) * (1 - (k - warmup) / (total - warmup)) ** power + lr_end
    # diffusers' schedules, as get_scheduler computes them
    if name == "constant":
        return lr
    if name == "constant_with_warmup":
        return lr * min(1.0, k / warmup)
    if name == "linear":
        return lr * (k / warmup if k < warmup else max(0.0, (total - k) / (total - warmup)))
    raise KeyError(name)


def our_rates(steps: list[int], **train) -> dict[int, float]:
    """The rate our scheduler gives after k steps, for each k in `steps`."""
    cfg = TrainParams(learning_rate=LR, lr_warmup_steps=WARMUP, max_train_steps=TOTAL, **train)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg, TOTAL)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for k in range(max(steps) + 1):
            if k in steps:
                out[k] = scheduler.get_last_lr()[0]
                assert optimizer.param_groups[0]["lr"] == out[k]
            scheduler.step()
    return out


def assert_equal_curves(ours: dict[int, float], reference) -> None:
    for k, rate in ours.items():
        expected = reference(k)
        assert math.isclose(rate, expected, rel_tol=1e-9, abs_tol=0.0), f"step {k}: {rate!r} != {expected!r}"


# (SimpleTuner's lr_scheduler, our TrainParams that reproduce it: what the importer writes)
CASES = [
    ("cosine", {"lr_scheduler": "cosine_oscillating", "lr_end": LR_END}),
    ("sine", {"lr_scheduler": "sine", "lr_end": LR_END}),
    ("cosine_with_restarts", {"lr_scheduler": "constant"}),
    ("polynomial", {"lr_scheduler": "polynomial", "lr_end": LR_END, "lr_power": 0.8}),
    ("constant", {"lr_scheduler": "constant"}),
    ("constant_with_warmup", {"lr_scheduler": "constant_with_warmup"}),
    ("linear", {"lr_scheduler": "linear"}),
]


@pytest.mark.parametrize("simpletuner_name,train", CASES, ids=[c[0] for c in CASES])
def test_schedule_equals_simpletuner(simpletuner_name, train):
    assert_equal_curves(our_rates(STEPS, **train), lambda k: simpletuner_rate(simpletuner_name, k))


def test_the_issue_numbers():
    """Step 500 of 1000, warmup 100, lr 1e-4: SimpleTuner's cosine is at its floor lr_end (4.0e-7); diffusers'
    cosine (ours, unchanged) is ~5.9e-5."""
    assert our_rates([500], lr_scheduler="cosine_oscillating", lr_end=LR_END)[500] == pytest.approx(4.0e-7, rel=1e-9)
    diffusers_cosine = our_rates([500], lr_scheduler="cosine")[500]
    assert diffusers_cosine == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 400 / 900)), rel=1e-9)


def test_diffusers_cosine_keeps_its_meaning():
    """Our `cosine` is still diffusers' warmup + half-cosine decay to 0 at the last step."""
    def reference(k):
        if k < WARMUP:
            return LR * k / WARMUP
        progress = (k - WARMUP) / (TOTAL - WARMUP)
        return LR * max(0.0, 0.5 * (1 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    assert_equal_curves(our_rates(STEPS, lr_scheduler="cosine"), reference)


def test_periodic_schedules_need_a_period_and_polynomial_a_lower_end():
    with pytest.raises(ValueError, match="half-period"):
        TrainParams(lr_scheduler="cosine_oscillating", lr_warmup_steps=0)
    with pytest.raises(ValueError, match="lr_end"):
        TrainParams(lr_scheduler="polynomial", learning_rate=1e-4, lr_end=1e-4)


def test_periodic_schedule_resumes_on_its_curve():
    """A scheduler rebuilt from a checkpoint's state_dict continues exactly where the first left off."""
    cfg = TrainParams(learning_rate=LR, lr_warmup_steps=7, lr_scheduler="sine", lr_end=LR_END)

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        return optimizer, build_lr_scheduler(optimizer, cfg, 50)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, straight = make()
        rates = []
        for _ in range(30):
            straight.step()
            rates.append(straight.get_last_lr()[0])
        _, first = make()
        for _ in range(12):
            first.step()
        _, resumed = make()
        resumed.load_state_dict(first.state_dict())
        continued = []
        for _ in range(18):
            resumed.step()
            continued.append(resumed.get_last_lr()[0])
    assert continued == rates[12:]


def _tiny_lora_model():
    from diffusers import Flux2Transformer2DModel

    from flux2lora.flavours import get_flavour
    from flux2lora.train.lora import add_lora, target_modules

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config).requires_grad_(False)
    params = add_lora(model, 4, None, 0.0, target_modules(model, "all"))
    for p in params:  # non-zero B so that every LoRA matrix gets a gradient
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model, params


def test_clipping_by_value_clamps_each_gradient_element():
    """SimpleTuner's default grad_clip_method value: with SGD (lr 1) the update is the gradient, so the clipped run's
    update is the unclipped run's, each element clamped to +-max_grad_norm (torch's clip_grad_value_ semantics);
    the returned norm is the norm before clipping in both."""
    from flux2lora.train.step import MicroBatch, TrainingStep

    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                       torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.5]))
    updates, norms = {}, {}
    base_model, _ = _tiny_lora_model()
    for method, clip in (("none", 0.0), ("value", 2e-4)):
        model = copy.deepcopy(base_model)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=1.0)
        step = TrainingStep(model, params, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0),
                            max_grad_norm=clip, grad_clip_method="value" if method == "value" else "norm")
        _, norms[method] = step([batch])
        updates[method] = [(b - p.detach()) for p, b in zip(params, before)]
    raw = torch.cat([u.flatten() for u in updates["none"]])
    clipped = torch.cat([u.flatten() for u in updates["value"]])
    assert raw.abs().max() > 2e-4 and (raw.abs() < 2e-4).any(), "the test must clip some elements and not others"
    torch.testing.assert_close(clipped, raw.clamp(-2e-4, 2e-4), rtol=0, atol=1e-7)
    assert norms["value"] == pytest.approx(norms["none"], rel=1e-6)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("sched") / "template", git=False, images=4,
                        **{"train.max_train_steps": 8, "train.train_batch_size": 2, "train.learning_rate": 1e-3})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def test_train_stage_runs_simpletuner_cosine_with_value_clipping(encoded, tmp_path):
    """The train stage uses the schedule and the clipping of params: the logged rates are SimpleTuner's cosine."""
    root = tmp_path / "p"
    shutil.copytree(encoded, root, symlinks=True)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(lr_scheduler="cosine_oscillating", lr_warmup_steps=3, lr_end=1e-5, grad_clip_method="value",
                        max_grad_norm=1e-3)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = run_stage("train", root / "params.yaml")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    history = sorted(client.get_metric_history(summary["mlflow_run_id"], "learning_rate"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9)) and math.isfinite(summary["final_loss"])
    for m in history:  # logged after step m.step: the rate of the next step
        expected = simpletuner_rate("cosine", m.step, lr=1e-3, lr_end=1e-5, warmup=3)
        # MLflow stores metrics as float64: exact
        assert math.isclose(m.value, expected, rel_tol=1e-9), (m.step, m.value, expected)
