"""The streamed training split (issue 17): same batches, same weights and metrics as the in-memory split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from brainlatent.data.dataset import (
    STREAM_ENV, ProcessedData, StreamedSplit, open_split, should_stream,
)
from brainlatent.train.checkpoint import load_checkpoint
from brainlatent.train.loop import LoopConfig, _batches, _epoch_data, run_loop
from brainlatent.train.runner import make_task


def _conv(params):
    """The conv AE (no data template): its weights depend on the batches alone."""
    cfg = dataclasses.replace(params.ae, arch="conv", hidden=())
    return dataclasses.replace(params, ae=cfg)


def _train(params, family, data, train, tmp_path, name, **loop_kwargs):
    torch.manual_seed(params.seed)
    task = make_task(family, params, data.grid.shape, torch.device("cpu"))
    cfg = params.family(family)
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed,
                      checkpoint=tmp_path / name / "last.pt", **loop_kwargs.pop("loop", {}))
    result = run_loop(task, train, data.load_split("val"), loop, **loop_kwargs)
    return task, result


def _assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_streamed_split_reads_what_memory_holds(tiny_processed):
    data = ProcessedData.open(tiny_processed)
    memory, streamed = data.load_split("train"), StreamedSplit.of(data, "train")
    assert len(streamed) == len(memory) and streamed.shape == memory.shape and streamed.ndim == 5
    idx = torch.tensor([3, 0, 5, 1])
    assert torch.equal(streamed[idx], memory[idx])  # order given, not the disk's
    assert torch.equal(streamed[1:4], memory[1:4])
    assert torch.equal(streamed[2], memory[2])
    torch.testing.assert_close(streamed.float().mean(0, keepdim=True), memory.mean(0, keepdim=True),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_loops_batches_and_leaves_the_rng_alone(tiny_processed, workers):
    data = ProcessedData.open(tiny_processed)
    memory, streamed = data.load_split("train"), StreamedSplit.of(data, "train")

    class _Task:
        device = torch.device("cpu")

    try:
        for epoch in range(2):  # persistent workers: the second epoch reads the new batches
            batches = _batches(len(memory), 3, torch.Generator().manual_seed(epoch))
            rng = torch.get_rng_state()
            expected = list(_epoch_data(memory, batches, _Task()))
            got = list(streamed.epoch_loader(batches, num_workers=workers))
            assert torch.equal(torch.get_rng_state(), rng)  # the loader's seed comes from its own generator
            assert len(got) == len(expected) == len(batches)
            for g, e in zip(got, expected):
                assert torch.equal(g, e)
    finally:
        streamed.close()


def test_streamed_training_gives_identical_weights_and_metrics(tiny_processed, tiny_params, tmp_path):
    params = _conv(tiny_params)
    data = ProcessedData.open(tiny_processed)
    a, ra = _train(params, "ae", data, data.load_split("train"), tmp_path, "memory")
    b, rb = _train(params, "ae", data, StreamedSplit.of(data, "train"), tmp_path, "streamed")
    _assert_same_weights(a, b)
    assert [{k: v for k, v in h.items() if k != "time/epoch_seconds"} for h in ra.history] == \
        [{k: v for k, v in h.items() if k != "time/epoch_seconds"} for h in rb.history]


def test_streamed_dense_template_matches_the_in_memory_mean(tiny_processed, tiny_params, tmp_path):
    """The dense AE's template is summed in float64 from a streamed split: equal to rounding."""
    data = ProcessedData.open(tiny_processed)
    params = dataclasses.replace(tiny_params, ae=dataclasses.replace(tiny_params.ae, epochs=1))
    task = make_task("ae", params, data.grid.shape, torch.device("cpu"))
    task.fit_data(StreamedSplit.of(data, "train"))
    torch.testing.assert_close(task.model.template, data.load_split("train").mean(0, keepdim=True),
                               rtol=0, atol=1e-6)


def test_streamed_gan_gives_identical_weights(tiny_processed, tiny_params, tmp_path):
    data = ProcessedData.open(tiny_processed)
    params = dataclasses.replace(tiny_params, gan=dataclasses.replace(tiny_params.gan, epochs=1))
    assert not params.gan.template
    a, _ = _train(params, "gan", data, data.load_split("train"), tmp_path, "memory")
    b, _ = _train(params, "gan", data, StreamedSplit.of(data, "train"), tmp_path, "streamed")
    _assert_same_weights(a, b)  # gan.template is off: nothing depends on the mean volume


def test_streamed_resume_is_bit_identical(tiny_processed, tiny_params, tmp_path):
    params = _conv(tiny_params)
    data = ProcessedData.open(tiny_processed)
    straight, _ = _train(params, "ae", data, data.load_split("train"), tmp_path, "straight")
    _, first = _train(params, "ae", data, StreamedSplit.of(data, "train"), tmp_path, "sliced",
                      loop={"stop_after_epoch": 1})
    assert not first.finished
    ckpt = load_checkpoint(tmp_path / "sliced" / "last.pt")
    torch.manual_seed(12345)  # the checkpoint restores the RNG: whatever ran before does not matter
    resumed, second = _train(params, "ae", data, StreamedSplit.of(data, "train"), tmp_path, "sliced",
                             resume_from=ckpt)
    assert second.finished and second.resumed_from == 1
    _assert_same_weights(straight, resumed)


def test_auto_rule_keeps_tiny_data_in_memory_and_streams_when_memory_is_short(tiny_processed, monkeypatch):
    monkeypatch.delenv(STREAM_ENV, raising=False)
    data = ProcessedData.open(tiny_processed)
    assert isinstance(open_split(data, "train"), torch.Tensor)  # tiny: memory, as before
    n = len(data.split_indices("train"))
    nbytes = n * int(np.prod(data.grid.shape)) * 4
    assert isinstance(open_split(data, "train", available=nbytes * 2), StreamedSplit)  # half of memory
    assert not should_stream(n, data.grid.shape, available=nbytes * 8)
    assert isinstance(open_split(data, "train", mode="always"), StreamedSplit)
    assert isinstance(open_split(data, "train", mode="never", available=1), torch.Tensor)
    monkeypatch.setenv(STREAM_ENV, "always")
    assert isinstance(open_split(data, "train"), StreamedSplit)
    monkeypatch.setenv(STREAM_ENV, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        open_split(data, "train")


def test_train_family_streams_when_told(tiny_processed, tiny_params, project, monkeypatch):
    """The runner's path: a streamed run gives the in-memory run's weights (conv AE, 2 epochs)."""
    params = _conv(tiny_params)
    from brainlatent.train.runner import train_family

    a = train_family("ae", dataclasses.replace(params, train=dataclasses.replace(params.train, checkpoint_dir="a")),
                     register=False)
    monkeypatch.setenv(STREAM_ENV, "always")
    b = train_family("ae", dataclasses.replace(params, train=dataclasses.replace(params.train, checkpoint_dir="b")),
                     register=False)
    wa, wb = load_checkpoint(project / "a/ae/last.pt")["model"], load_checkpoint(project / "b/ae/last.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a.metrics["val/mse"] == b.metrics["val/mse"]
