"""Model layer: NB likelihood, heads, backbones and their weights (real her2st counts where data matter)."""

from __future__ import annotations

import time

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb.errors import StimageInputError, WeightsUnavailableError
from stimage_nb.models import (
    CellTypeHead,
    NBHead,
    STModel,
    build_model,
    create_backbone,
    hub_reachable,
    labels_to_targets,
    moment_init,
    nb_log_prob,
    nb_nll,
    nb_variance,
    soft_cross_entropy,
    to_torch_distribution,
)


# ---------------------------------------------------------------------- negative binomial
def test_nb_log_prob_matches_torch_distribution():
    y = torch.tensor([0, 1, 3, 10, 57, 400, 2500], dtype=torch.float64).view(-1, 1)
    mu = torch.tensor([1e-3, 0.2, 1.0, 7.5, 60.0, 900.0], dtype=torch.float64)
    theta = torch.tensor([0.05, 0.5, 1.0, 3.0, 20.0, 500.0], dtype=torch.float64)
    ours = nb_log_prob(y, torch.log(mu), torch.log(theta))
    # torch: total_count = theta, probs = success probability mu / (theta + mu)
    ref = torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (theta + mu)).log_prob(y)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(to_torch_distribution(torch.log(mu), torch.log(theta)).log_prob(y), ref, rtol=1e-9)
    assert torch.allclose(nb_nll(y, torch.log(mu).expand(7, 6), torch.log(theta)), -ref.mean())
    # moments of the parametrisation
    d = to_torch_distribution(torch.log(mu), torch.log(theta))
    assert torch.allclose(d.mean, mu) and torch.allclose(d.variance, nb_variance(mu, theta))


def test_nb_nll_is_stable_and_differentiable_in_float32():
    y = torch.tensor([[0.0, 5.0, 1e4]])
    log_mu = torch.tensor([[-15.0, 2.0, 25.0]], requires_grad=True)
    log_theta = torch.tensor([-6.0, 0.0, 11.0], requires_grad=True)
    loss = nb_nll(y, log_mu, log_theta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_mu.grad).all() and torch.isfinite(log_theta.grad).all()


def test_moment_init_recovers_mean_and_dispersion():
    d = torch.distributions.NegativeBinomial(total_count=torch.tensor([2.0, 10.0]), logits=torch.log(torch.tensor([5.0, 50.0]) / torch.tensor([2.0, 10.0])))
    y = d.sample(torch.Size([40000]))
    log_mu, log_theta = moment_init(y)
    assert torch.allclose(log_mu.exp(), torch.tensor([5.0, 50.0]), rtol=0.03)
    assert torch.allclose(log_theta.exp(), torch.tensor([2.0, 10.0]), rtol=0.1)


def test_nb_head_starts_at_the_real_gene_means():
    s = kit.sections(("C2",))[0]
    counts = torch.from_numpy(s.adata.X.toarray())
    head = NBHead(16, counts.shape[1])
    head.init_from_counts(counts)
    log_mu, log_theta = head(torch.randn(5, 16) * 0.1)
    mean = counts.mean(0).clamp_min(1e-3)
    assert torch.allclose(log_mu.exp().mean(0), mean, rtol=0.1)
    assert log_theta.shape == (counts.shape[1],)
    # with the moment-initialised dispersion the untrained head beats a Poisson-like one on real counts
    nll = nb_nll(counts, torch.log(mean).expand_as(counts), log_theta)
    nll_pois = nb_nll(counts, torch.log(mean).expand_as(counts), torch.full_like(log_theta, 11.0))
    assert nll < nll_pois


# ---------------------------------------------------------------------- cell types
def test_soft_cross_entropy_matches_torch_and_masks_nan_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    p = torch.softmax(torch.randn(6, 4), 1)
    ref = torch.nn.functional.cross_entropy(logits, p)
    assert torch.allclose(soft_cross_entropy(logits, p), ref, atol=1e-6)
    q = p.clone()
    q[[1, 4]] = float("nan")
    keep = [0, 2, 3, 5]
    assert torch.allclose(soft_cross_entropy(logits, q), torch.nn.functional.cross_entropy(logits[keep], p[keep]), atol=1e-6)
    # unnormalised proportions are renormalised
    assert torch.allclose(soft_cross_entropy(logits, 3 * p), ref, atol=1e-6)
    allnan = soft_cross_entropy(logits, torch.full_like(p, float("nan")))
    allnan.backward()
    assert float(allnan.detach()) == 0.0 and logits.grad is not None


def test_hard_labels_equal_class_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(5, 3)
    classes = ["Tumor", "Stroma", "Immune"]
    t = labels_to_targets(["Stroma", "Tumor", None, "unknown", "Immune"], classes)
    assert torch.isnan(t[2]).all() and torch.isnan(t[3]).all()
    ref = torch.nn.functional.cross_entropy(logits[[0, 1, 4]], torch.tensor([1, 0, 2]))
    assert torch.allclose(soft_cross_entropy(logits, t), ref, atol=1e-6)


def test_celltype_head_bias_from_real_proportions():
    s = kit.sections(("C3",))[0]
    props = torch.tensor(s.adata.obsm["celltype_proportions"].to_numpy(dtype=np.float32))
    head = CellTypeHead(8, props.shape[1])
    head.init_from_targets(props)
    p0 = torch.softmax(head(torch.zeros(1, 8)), 1)[0]
    assert torch.allclose(p0, props.mean(0) / props.mean(0).sum(), atol=1e-3)


# ---------------------------------------------------------------------- backbones and weights
def test_any_timm_backbone_by_name_gives_pooled_features():
    for name in ("test_resnet", "test_vit"):
        m = create_backbone(name, "none").eval()
        x = torch.rand(2, 3, 32, 32) if name == "test_resnet" else torch.rand(2, 3, 160, 160)
        f = m(x)
        assert f.shape == (2, m.num_features)
    with pytest.raises(StimageInputError, match="unknown timm backbone"):
        create_backbone("resnet_does_not_exist", "none")


def test_local_safetensors_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = create_backbone("test_resnet", "none").eval()
    f = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    torch.manual_seed(99)  # a different random init that the file must overwrite
    loaded = create_backbone("test_resnet", f).eval()
    x = torch.rand(3, 3, 48, 48)
    assert torch.equal(src(x), loaded(x))
    # a file with a classifier (and a wrapper prefix) still loads; the classifier is ignored
    import timm

    full = timm.create_model("test_resnet", num_classes=7)
    full.load_state_dict(src.state_dict(), strict=False)
    save_file({"module." + k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "cls.safetensors"))
    assert torch.equal(create_backbone("test_resnet", tmp_path / "cls.safetensors").eval()(x), src(x))


def test_wrong_or_missing_local_weights_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    other = create_backbone("test_efficientnet", "none")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "eff.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="eff.safetensors.*(missing|wrong shape)"):
        create_backbone("test_resnet", tmp_path / "eff.safetensors")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_backbone("test_resnet", tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        create_backbone("test_resnet", tmp_path / "junk.safetensors")


@pytest.mark.parametrize("weights", ["pretrained", "test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k"])
def test_offline_pretrained_weights_fail_fast(monkeypatch, tmp_path, weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=r"--weights PATH.safetensors.*--weights none"):
        create_backbone("test_resnet", weights)
    assert time.perf_counter() - t < 10


def test_silent_hub_is_detected_without_hanging(monkeypatch, tmp_path):
    import socket

    # a server that accepts connections and never answers: a request without a timeout would hang forever
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        t = time.perf_counter()
        assert hub_reachable(timeout=1.0) is False
        with pytest.raises(WeightsUnavailableError, match="did not answer within 1s"):
            create_backbone("test_resnet", "pretrained", hub_timeout=1.0)
        assert time.perf_counter() - t < 15
    finally:
        srv.close()


def test_stmodel_config_rebuilds_the_same_architecture():
    torch.manual_seed(0)
    m = STModel(create_backbone("test_resnet", "none"), n_genes=12, n_celltypes=4, backbone_name="test_resnet").eval()
    m2 = build_model(m.config(), "none").eval()
    m2.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 32, 32)
    o, o2 = m(x), m2(x)
    assert o.log_mu.shape == (2, 12) and o.logits.shape == (2, 4) and o.log_theta.shape == (12,)
    assert torch.equal(o.log_mu, o2.log_mu) and torch.equal(o.logits, o2.logits)
