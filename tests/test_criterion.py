"""SetCriterion against an explicit reference, importance sampling, and a tiny model that overfits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from m2f.model.config import DecoderConfig, ModelConfig, PixelDecoderConfig, ResNetConfig
from m2f.model.criterion import LossConfig, SetCriterion, average_num_masks
from m2f.model.mask2former import Mask2FormerOutput, build_model
from m2f.model.point_sampling import point_sample, uncertain_point_coords
from m2f.model.transformer_decoder import Prediction

K = 3  # classes in the synthetic cases


class RecordingCriterion(SetCriterion):
    """Keeps the matches and the points it used, in order, so the reference can replay them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.points: list[torch.Tensor] = []
        self.matches: list = []
        matcher = self.matcher

        def recording_matcher(*a, **kw):
            self.matches.append(matcher(*a, **kw))
            return self.matches[-1]

        self.matcher = recording_matcher

    def sample_points(self, logits, generator=None):
        self.points.append(super().sample_points(logits, generator))
        return self.points[-1]


def random_output(g: torch.Generator, b: int = 3, q: int = 6, h: int = 8, w: int = 10, aux: int = 2):
    def pred() -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * torch.randn(b, q, K + 1, generator=g), 3 * torch.randn(b, q, h, w, generator=g)

    final = pred()
    output = Mask2FormerOutput(*final, aux=[Prediction(*pred()) for _ in range(aux)])
    return output


def random_targets(g: torch.Generator, ns: list[int], h: int = 32, w: int = 40) -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.randint(0, K, (n,), generator=g), "masks": torch.rand(n, h, w, generator=g) > 0.5} for n in ns
    ]


def reference_losses(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    matches: list[tuple[torch.Tensor, torch.Tensor]],
    points: torch.Tensor | None,
    config: LossConfig,
) -> tuple[float, float, float]:
    """Weighted CE, BCE and dice from loops over queries and matched pairs (float64)."""
    b, q, _ = class_logits.shape
    num_masks = max(sum(len(t["labels"]) for t in targets), 1)
    weights = [1.0] * K + [config.no_object_weight]
    num = den = 0.0
    for i in range(b):
        pred_idx, tgt_idx = matches[i]
        assigned = {int(p): int(targets[i]["labels"][t]) for p, t in zip(pred_idx, tgt_idx, strict=True)}
        log_probs = class_logits[i].double().log_softmax(-1)
        for j in range(q):
            c = assigned.get(j, K)
            num -= weights[c] * log_probs[j, c].item()
            den += weights[c]
    ce = num / den

    bce = dice = 0.0
    m = 0  # pairs in image order, then query order: the order the criterion samples points in
    for i in range(b):
        for p, t in zip(*matches[i], strict=True):
            coords = points[m : m + 1].double()
            x = point_sample(mask_logits[i, p][None, None].double(), coords)[0, 0]
            y = point_sample(targets[i]["masks"][t][None, None].double(), coords)[0, 0]
            s = x.sigmoid()
            bce += -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean().item()
            dice += 1 - ((2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)).item()
            m += 1
    return (
        config.class_weight * ce,
        config.mask_weight * bce / num_masks,
        config.dice_weight * dice / num_masks,
    )


@pytest.mark.parametrize("ns", [[2, 0, 3], [1, 1, 1], [0, 0, 0]])
def test_losses_equal_reference(ns: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(ns))
    output, targets = random_output(g), random_targets(g, ns)
    config = LossConfig(num_points=128, no_object_weight=0.3)
    crit = RecordingCriterion(K, config)
    losses = crit(output, targets, generator=torch.Generator().manual_seed(0))

    preds = [(output.class_logits, output.mask_logits, "")] + [
        (p.class_logits, p.mask_logits, f"_{i}") for i, p in enumerate(output.aux)
    ]
    assert set(losses) == {f"loss_{n}{s}" for _, _, s in preds for n in ("ce", "mask", "dice")} | {"loss"}
    points = iter(crit.points)
    for (class_logits, mask_logits, suffix), matches in zip(preds, crit.matches, strict=True):
        pts = next(points) if sum(ns) else None
        if pts is not None:
            assert pts.shape == (sum(ns), 128, 2)
        want = reference_losses(class_logits, mask_logits, targets, matches, pts, config)
        got = [losses[f"loss_{n}{suffix}"].item() for n in ("ce", "mask", "dice")]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    total = sum(v.item() for k, v in losses.items() if k != "loss")
    assert losses["loss"].item() == pytest.approx(total, rel=1e-6)


def test_all_empty_batch_gives_class_loss_only_and_backprops() -> None:
    g = torch.Generator().manual_seed(11)
    output, targets = random_output(g, aux=1), random_targets(g, [0, 0, 0])
    output.mask_logits.requires_grad_(True)
    output.class_logits.requires_grad_(True)
    losses = SetCriterion(K, LossConfig(num_points=32))(output, targets)
    assert losses["loss_mask"].item() == losses["loss_dice"].item() == 0.0
    # Every query targets "no object": the weighted mean is the plain mean.
    want = -output.class_logits.detach().log_softmax(-1)[..., K].mean().item() * 2.0
    assert losses["loss_ce"].item() == pytest.approx(want, rel=1e-6)
    losses["loss"].backward()
    assert output.mask_logits.grad is not None and not output.mask_logits.grad.any()
    assert output.class_logits.grad is not None and output.class_logits.grad.abs().sum() > 0


def test_deep_supervision_off_and_config_checks() -> None:
    g = torch.Generator().manual_seed(12)
    output, targets = random_output(g), random_targets(g, [1, 2, 0])
    losses = SetCriterion(K, LossConfig(num_points=32, deep_supervision=False))(output, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss"}
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(K + 1, LossConfig(num_points=32))(output, targets)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        LossConfig(importance_sample_ratio=1.5)
    with pytest.raises(ValueError, match="no_object_weight"):
        LossConfig(no_object_weight=-1)


def test_same_generator_same_loss() -> None:
    g = torch.Generator().manual_seed(13)
    output, targets = random_output(g), random_targets(g, [2, 1, 2])
    crit = SetCriterion(K, LossConfig(num_points=64))
    a = crit(output, targets, generator=torch.Generator().manual_seed(1))["loss"]
    b = crit(output, targets, generator=torch.Generator().manual_seed(1))["loss"]
    assert a.item() == b.item()


def _num_masks_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counts = [[2, 3], [1]][rank]  # rank 0 holds 5 masks, rank 1 holds 1
        targets = random_targets(torch.Generator().manual_seed(rank), counts)
        value = average_num_masks(targets, torch.device("cpu")).item()
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(value))
    finally:
        dist.destroy_process_group()


def test_num_masks_is_averaged_across_workers(tmp_path) -> None:
    targets = random_targets(torch.Generator().manual_seed(14), [2, 3])
    assert average_num_masks(targets, torch.device("cpu")).item() == 5
    assert average_num_masks(random_targets(torch.Generator(), [0]), torch.device("cpu")).item() == 1  # clamped

    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "num_masks")
    mp.spawn(_num_masks_worker, args=(2, port, out), nprocs=2, join=True)
    # a real gloo process group: both workers see (5 + 1) / 2
    assert [float(Path(f"{out}.{r}").read_text()) for r in range(2)] == [3.0, 3.0]


def test_uncertain_points_pick_the_most_uncertain_candidates() -> None:
    # A ramp whose zero crossing is the vertical line x = 0.3.
    logits = (torch.linspace(-1, 1, 64)[None, :] - -0.4).expand(32, 64)[None, None].contiguous()
    coords = uncertain_point_coords(logits, 100, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (1, 100, 2) and coords.min() >= 0 and coords.max() <= 1

    # Replay: 300 candidates, the 75 with the smallest |logit| first, then 25 fresh uniform points.
    replay = torch.Generator().manual_seed(0)
    candidates = torch.rand(1, 300, 2, generator=replay)
    distance = point_sample(logits, candidates)[0, 0].abs()
    want = candidates[0, distance.argsort()[:75]]
    assert sorted(map(tuple, coords[0, :75].tolist())) == sorted(map(tuple, want.tolist()))
    torch.testing.assert_close(coords[0, 75:], torch.rand(1, 25, 2, generator=replay)[0])
    assert (coords[0, :75, 0] - 0.3).abs().mean() < 0.1  # they hug the zero crossing (uniform: ~0.29)

    uniform = uncertain_point_coords(logits, 50, 3.0, 0.0, generator=torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    torch.rand(1, 150, 2, generator=replay)  # the candidates, unused when nothing is importance-sampled
    torch.testing.assert_close(uniform, torch.rand(1, 50, 2, generator=replay))
    assert uncertain_point_coords(torch.zeros(0, 1, 4, 4), 10).shape == (0, 10, 2)


def tiny_model() -> torch.nn.Module:
    config = ModelConfig(
        name="tiny",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=16, widths=(32, 64, 128, 256), norm="bn"),
        num_classes=K,
        class_names=("a", "b", "c"),
        is_thing=(True, True, False),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_layers=2, num_heads=4, ffn_dim=128),
        decoder=DecoderConfig(hidden_dim=64, num_queries=10, num_heads=4, ffn_dim=128, num_layers=3),
    )
    return build_model(config)


def fixed_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 64x64 images: a bright square and a dark disc on a mid-grey ground, plus the ground."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    images, targets = [], []
    for cx, cy, side in ((20, 24, 18), (40, 36, 26)):
        square = ((xx - cx).abs() < side // 2) & ((yy - cy).abs() < side // 2)
        disc = (xx - (64 - cx)) ** 2 + (yy - (64 - cy)) ** 2 < (side // 2) ** 2
        disc &= ~square
        ground = ~(square | disc)
        image = torch.zeros(3, 64, 64)
        image[:, square] = 2.0
        image[:, disc] = -2.0
        images.append(image)
        targets.append({"labels": torch.tensor([0, 1, 2]), "masks": torch.stack([square, disc, ground])})
    return torch.stack(images), targets


def test_tiny_model_loss_is_finite_and_backprops() -> None:
    torch.manual_seed(0)
    net = tiny_model()
    images, targets = fixed_batch()
    output = net(images)
    assert len(output.aux) == 3
    losses = SetCriterion(K, LossConfig(num_points=256))(output, targets, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 * 4 + 1 and all(math.isfinite(v.item()) for v in losses.values())
    losses["loss"].backward()
    head = net.transformer_decoder
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    net = tiny_model().train()
    images, targets = fixed_batch()
    crit = SetCriterion(K, LossConfig(num_points=512))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    history = []
    for step in range(21):  # 20 updates, then the loss after them
        loss = crit(net(images), targets, generator=torch.Generator().manual_seed(step))["loss"]
        history.append(loss.item())
        if step == 20:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0], history
