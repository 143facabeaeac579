"""BatchNorm recalibration (debora.train.batchnorm): the statistics against their closed form in
float64, modes and momenta restored, and the trainer evaluating with recalibrated statistics."""
import copy

import pytest
import torch
from torch import nn

from debora.train.batchnorm import batch_statistics, batchnorm_layers, recalibrate_batchnorm


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(),
                        nn.Dropout(0.5), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 36, 2))
    return net.double()


def _closed_form(net, batches):
    """Per batch: the BN inputs' channel mean and unbiased variance, each BN normalising with the
    batch's biased variance (training mode) and dropout off; then the mean over batches."""
    conv1, bn1, _, _, conv2, bn2 = list(net)[:6]
    stats = {1: [], 2: []}
    for x in batches:
        h = conv1(x)
        m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
        stats[1].append((m, v))
        vb = h.var((0, 2, 3), unbiased=False)
        h = (h - m[None, :, None, None]) / torch.sqrt(vb + bn1.eps)[None, :, None, None]
        h = torch.relu(h * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None])
        h = conv2(h)
        stats[2].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
    return {k: (torch.stack([a for a, _ in v]).mean(0), torch.stack([b for _, b in v]).mean(0))
            for k, v in stats.items()}


def test_recalibrated_statistics_are_the_mean_batch_statistics_in_float64():
    net = _net()
    with torch.no_grad():   # a trained-looking BN affine part and stale running statistics
        for bn in batchnorm_layers(net):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.fill_(3.0), bn.running_var.fill_(7.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    net.train()
    n = recalibrate_batchnorm(net, batches, lambda m, b: m(b))
    assert n == 2
    with torch.no_grad():
        ref = _closed_form(net, batches)
    for k, bn in ((1, net[1]), (2, net[5])):
        torch.testing.assert_close(bn.running_mean, ref[k][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, ref[k][1], rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 3
    # modes and momenta restored (the net was in training mode; dropout stays a train-mode module)
    assert net.training and all(m.training for m in net.modules())
    assert net[1].momentum == 0.01 and net[5].momentum == 0.1
    net.eval()
    recalibrate_batchnorm(net, batches, lambda m, b: m(b))
    assert not any(m.training for m in net.modules())


def test_batch_statistics_normalises_by_the_batch_and_leaves_the_running_estimates_alone():
    """Inside batch_statistics (the Taylor cut's gradient pass) the net in eval mode computes what the
    closed form does (batch statistics, dropout off); running estimates, counters and modes unchanged."""
    net = _net()
    net.eval()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with batch_statistics(net):
        out = net(x)
    conv1, bn1, relu, _, conv2, bn2, flat, lin = list(net)

    def bn(h, layer):   # training-mode BatchNorm: the batch mean and biased variance
        m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        return ((h - m[None, :, None, None]) / torch.sqrt(v + layer.eps)[None, :, None, None]
                * layer.weight[None, :, None, None] + layer.bias[None, :, None, None])
    ref = lin(flat(bn(conv2(relu(bn(conv1(x), bn1))), bn2)))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in net.modules()) and all(b.track_running_stats for b in batchnorm_layers(net))


def test_the_result_does_not_depend_on_the_old_statistics():
    a, b = _net(), _net()
    with torch.no_grad():
        b[1].running_mean.fill_(-5.0), b[5].running_var.fill_(100.0)
    batches = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    for net in (a, b):
        recalibrate_batchnorm(net, batches, lambda m, x: m(x))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_a_model_without_batchnorm_is_left_alone_and_not_run():
    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    calls = []
    assert recalibrate_batchnorm(net, [torch.randn(2, 3)], lambda m, b: calls.append(b)) == 0
    assert calls == []


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(_net(), [], lambda m, b: m(b))


def test_the_trainer_evaluates_with_statistics_recalibrated_on_d2(tmp_path, monkeypatch):
    """The packaged EfficientNet-Lite0 on fake images: the final statistics are those of a fresh
    recalibration of the trained weights (recalibrating again changes nothing), and the reported
    accuracy is the returned model's; with ``recalibrate_bn=False`` they are not."""
    from debora.train import TrainConfig, train
    from test_train_tiny import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, train=48, test=16)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    stats = {}
    for flag in (True, False):
        cfg = TrainConfig(dataset="fashion-mnist", init_rank=2, target_rank=1.0, epochs=1.0, batch_size=16,
                          image_size=32, eval_every=0, progress=False, plots=False, seed=0, device="cpu",
                          recalibrate_bn=flag, output_dir=str(tmp_path / f"run{flag}"))
        holder = {}
        res = train(cfg, callback=lambda trainer, state, info: holder.setdefault("t", trainer))
        trainer = holder["t"]
        bns = batchnorm_layers(res.model)
        before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
        cfg_on = copy.copy(trainer.cfg)
        cfg_on.recalibrate_bn = True
        trainer.cfg = cfg_on
        assert trainer.recalibrate_bn() == len(bns) > 0
        after = [(bn.running_mean, bn.running_var) for bn in bns]
        stats[flag] = all(torch.equal(m0, m1) and torch.equal(v0, v1) for (m0, v0), (m1, v1) in zip(before, after))
        if flag:
            assert trainer.evaluate()["eval_acc"] == res.summary["eval_acc_end"]
    assert stats[True] and not stats[False]
