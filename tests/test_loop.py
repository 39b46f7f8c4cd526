"""The one training step of echo/loop.py (issue: one step, one record): the gradient clip is per
member (clipping one member's gradient changes no other member's), `grad_clip` acts in training
and nowhere else, and the epoch record is one definition that old checkpoints are read into."""
import pytest
import torch

from echo.ensemble import Ensemble
from echo.loop import clip_member_grads_
from echo.metrics import EPOCH_METRICS
from echo.train import TrainConfig, fit, load_checkpoint, save_checkpoint

SHAPE = (1, 8, 8)


def stacked_grads(ensemble, x, scale=None):
    """The members' gradients of one batch (same random draws each call), member k's scaled by
    scale[k] where given."""
    for p in ensemble.parameters():
        p.grad = None
    torch.manual_seed(0)
    ensemble(x).loss.backward()
    if scale is not None:
        with torch.no_grad():
            for p in ensemble.parameters():
                p.grad *= torch.tensor(scale).view(-1, *[1] * (p.dim() - 1))
    return ensemble


def test_clipping_one_members_gradient_changes_no_other_member():
    ensemble = Ensemble.build("echo", [0.5, 1.0, 2.0], seeds=[0, 1, 2], arch="mlp",
                              latent_dim=6, input_shape=SHAPE, strategy="loop")
    x = torch.rand(3, 20, *SHAPE).bernoulli()
    norms = []
    for k in range(3):
        member_grads = [p.grad[k] for p in stacked_grads(ensemble, x).parameters()]
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in member_grads])).item())
    max_norm = 2 * max(norms)               # above every member's own norm: nothing to clip
    reference = [p.grad.clone() for p in stacked_grads(ensemble, x).parameters()]
    clip_member_grads_(list(ensemble.parameters()), max_norm, stacked=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(ensemble.parameters(), reference))
    # Member 2's gradient 1000x longer: only it is clipped; one norm over the stacked
    # parameters (clip_grad_norm_) would have shrunk members 0 and 1 too.
    stacked_grads(ensemble, x, scale=[1.0, 1.0, 1e3])
    clip_member_grads_(list(ensemble.parameters()), max_norm, stacked=True)
    for p, g in zip(ensemble.parameters(), reference):
        assert torch.equal(p.grad[:2], g[:2])
    # ...and member 2 is clipped exactly as its separate run would be.
    separate = ensemble.member(2)
    for p, stacked in zip(separate.parameters(), stacked_grads(ensemble, x, [1.0, 1.0, 1e3])
                          .parameters()):
        p.grad = stacked.grad[2].clone()
    clip_member_grads_(list(ensemble.parameters()), max_norm, stacked=True)
    torch.nn.utils.clip_grad_norm_(list(separate.parameters()), max_norm)
    for p, stacked in zip(separate.parameters(), ensemble.parameters()):
        torch.testing.assert_close(stacked.grad[2], p.grad, rtol=1e-5, atol=1e-9)
    # A single model (no member dimension) is clipped as torch clips it.
    own = [p.grad.clone() for p in separate.parameters()]
    for p in separate.parameters():
        p.grad = p.grad * 10
    clip_member_grads_(list(separate.parameters()), max_norm, stacked=False)
    for p, g in zip(separate.parameters(), own):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-9)


def _tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(method="vae", dataset="digits", arch="mlp", latent_dim=4,
                                 epochs=2, progress=False, seed=0, train_limit=200,
                                 test_limit=100, batch_size=50), **overrides})


def _strip(history):
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in history]


def test_grad_clip_acts_in_training_and_the_record_is_the_libraries(tmp_path):
    plain = fit(_tiny(out=str(tmp_path / "plain")))
    # Off by default; a bound no gradient reaches changes nothing; a tight one changes the run.
    assert _tiny().grad_clip is None
    assert _strip(fit(_tiny(grad_clip=1e9)).history) == _strip(plain.history)
    assert fit(_tiny(grad_clip=1e-3)).history[-1]["test_neg_elbo"] != \
        plain.history[-1]["test_neg_elbo"]
    # The epoch record: every value of EPOCH_METRICS, the trained loss D + beta R and the
    # schedule's learning rate included (lr decays to 0 at the end), beside the `lr` setting.
    last = plain.history[-1]
    assert set(last) == {"epoch", *EPOCH_METRICS}
    assert last["train_loss"] == pytest.approx(last["train_distortion"] + last["train_rate"])
    assert last["epoch_lr"] == 0.0 and plain.history[0]["epoch_lr"] > 0
    # A checkpoint written before the record held the losses and epoch_lr (its `lr`) reads as
    # today's, and a run resumed from it reports every value.
    state = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    beta = 2.0
    state["config"]["beta"] = beta
    state["history"] = [{("lr" if k == "epoch_lr" else k): v for k, v in m.items()
                         if k not in ("train_loss", "test_loss")} for m in state["history"]]
    save_checkpoint(tmp_path / "old.pt", state)
    upgraded = load_checkpoint(tmp_path / "old.pt")["history"]
    assert [set(m) for m in upgraded] == [{"epoch", *EPOCH_METRICS}] * 2
    assert upgraded[0]["test_loss"] == pytest.approx(
        upgraded[0]["test_distortion"] + beta * upgraded[0]["test_rate"])
    state["epoch"], state["history"] = 1, state["history"][:1]
    save_checkpoint(tmp_path / "old_mid.pt", state)
    resumed = fit(_tiny(beta=beta), resume=load_checkpoint(tmp_path / "old_mid.pt")).history
    assert [set(m) for m in resumed] == [{"epoch", *EPOCH_METRICS}] * 2
