"""Training augmentations for field input: each one does what it says, seeded and batched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from visionops import augment  # noqa: E402
from visionops.config import TrainParams  # noqa: E402

MEAN, STD = torch.tensor([0.1307]), torch.tensor([0.3081])
OFF = {
    "max_rotate": 0.0,
    "max_shear": 0.0,
    "max_scale": 0.0,
    "thickness": 0.0,
    "blur": 0.0,
    "contrast": 0.0,
    "background": 0.0,
}


def strokes(n: int = 8) -> torch.Tensor:
    """A batch of ink-unit images (a bar and a cross), normalised like MNIST."""
    u = torch.zeros(n, 1, 28, 28)
    u[:, :, 6:22, 13:15] = 1.0
    u[:, :, 13:15, 8:20] = 1.0
    return (u - MEAN.view(1, -1, 1, 1)) / STD.view(1, -1, 1, 1)


def ink(x: torch.Tensor) -> torch.Tensor:
    return x * STD.view(1, -1, 1, 1) + MEAN.view(1, -1, 1, 1)


def run(x: torch.Tensor, seed: int = 0, **params: float) -> torch.Tensor:
    tp = TrainParams(**{**OFF, **params})
    d = augment.draw_augmentation(len(x), tp, torch.Generator().manual_seed(seed))
    return augment.augment_batch(x, d, MEAN, STD)


def test_all_off_is_the_identity_and_reported_as_off() -> None:
    x = strokes()
    assert torch.allclose(run(x), x, atol=1e-5)
    assert not augment.is_enabled(TrainParams(**OFF))
    assert not augment.is_enabled(TrainParams(augment=False))
    assert augment.is_enabled(TrainParams())


def test_same_seed_same_batch_and_another_seed_differs() -> None:
    x = strokes()
    defaults = {k: getattr(TrainParams(), k) for k in OFF}
    a, b, c = run(x, 1, **defaults), run(x, 1, **defaults), run(x, 2, **defaults)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape


def test_thickness_grows_or_shrinks_the_ink_by_at_most_one_pixel() -> None:
    x = strokes(64)
    base = ink(x).sum(dim=(1, 2, 3))
    out = ink(run(x, thickness=1.0)).sum(dim=(1, 2, 3))
    grew, shrank = out > base + 1e-3, out < base - 1e-3
    assert grew.any() and shrank.any()
    # The bar and cross have ~2x44 edge pixels: one pixel more on every side at most.
    assert (out - base).max() <= 2 * 44 + 8
    assert (out[shrank] > 0.3 * base[shrank]).all()  # thinning never erases the strokes


def test_rotation_moves_ink_but_keeps_its_amount() -> None:
    x = strokes(16)
    out = ink(run(x, max_rotate=30.0))
    assert not torch.allclose(out, ink(x), atol=1e-3)
    mass_in, mass_out = ink(x).sum(dim=(1, 2, 3)), out.sum(dim=(1, 2, 3))
    assert torch.allclose(mass_out, mass_in, rtol=0.1)


def test_blur_contrast_and_background_levels() -> None:
    x = strokes(32)
    blurred = ink(run(x, blur=1.0))
    assert blurred.max() < 1.0 - 1e-3  # edges softened, peak lowered
    faint = ink(run(x, contrast=0.5))
    peaks = faint.amax(dim=(1, 2, 3))
    assert (peaks >= 0.5 - 1e-5).all() and (peaks <= 1.0 + 1e-5).all() and peaks.min() < 0.9
    fog = ink(run(x, background=0.2))
    floor = fog.amin(dim=(1, 2, 3))
    assert (floor >= -1e-5).all() and (floor <= 0.2 + 1e-5).all() and floor.max() > 0.05


def test_ddp_ranks_slice_the_same_draws() -> None:
    tp = TrainParams()
    d = augment.draw_augmentation(10, tp, torch.Generator().manual_seed(0))
    part = d.rows(4, 7)
    assert torch.equal(part.angle, d.angle[4:7]) and torch.equal(part.blur_sigma, d.blur_sigma[4:7])
