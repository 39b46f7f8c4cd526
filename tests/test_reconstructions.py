"""The reconstruction grid every trial writes beside its model (pipeline.sweep.trainable):
the test images above, the model's reconstructions below, pixel for pixel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from echo.train import TrainConfig, fit, load_model, load_train_test, save_checkpoint
from pipeline.sweep.trainable import (RECON_CAPTION, RECON_COUNT, RECON_GAP, RECON_MIN_PIXELS,
                                      write_reconstructions)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A VAE on the 8x8 digits after one epoch, saved as a trial saves it."""
    config = TrainConfig(method="vae", dataset="digits", arch="mlp", latent_dim=4, epochs=1,
                         progress=False, seed=0, train_limit=200, test_limit=100, batch_size=50)
    states = []
    fit(config, on_epoch=lambda epoch, record, state: states.append(state()))
    path = tmp_path_factory.mktemp("recon") / "model.pt"
    save_checkpoint(path, states[-1])
    return path, config


def test_the_grid_shows_the_test_images_above_their_reconstructions(trained, tmp_path):
    path, config = trained
    out = tmp_path / "reconstructions.png"
    # The encoder samples its code: the same random draws below, in the same order (the
    # model, then one batch of the test set through it).
    torch.manual_seed(1)
    write_reconstructions(path, config, out)
    grid = np.asarray(Image.open(out).convert("L"), dtype=float) / 255

    torch.manual_seed(1)
    model, _ = load_model(path)
    model.eval()
    x_test = load_train_test(config)[1][:config.test_limit][:config.batch_size]
    with torch.no_grad():
        probs = model.likelihood.mean(model(x_test, config.beta).logits)
    scale = -(-RECON_MIN_PIXELS // 8)                       # 8x8 digits, each pixel a block
    cell = 8 * scale + RECON_GAP
    assert grid.shape[0] == RECON_CAPTION + 2 * cell + RECON_GAP
    assert grid.shape[1] >= RECON_COUNT * cell + RECON_GAP
    assert grid[:RECON_CAPTION].min() < 0.5                  # the caption is drawn
    for row, images in enumerate((x_test, probs)):
        for col in range(RECON_COUNT):
            top, left = RECON_CAPTION + RECON_GAP + row * cell, RECON_GAP + col * cell
            tile = grid[top:top + 8 * scale, left:left + 8 * scale]
            expected = np.kron(images[col, 0].numpy(), np.ones((scale, scale)))
            assert np.abs(tile - expected).max() <= 0.5 / 255 + 1e-6, (row, col)
