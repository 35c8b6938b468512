"""Data-parallel training: 2 processes (gloo, CPU) give the model of 1 process with the same global batch."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pdenet.data import BatchLoader
from pdenet.distributed import DistContext, GlobalBatchNorm2d, init_distributed, sync_batchnorm
from pdenet.training import ClassificationTask, TrainConfig, Trainer, seed_everything
from test_cli import fmnist_dir  # noqa: F401  (fixture)
from test_training import ToyNet, toy_dataset

GLOBAL_BATCH = 16
CONFIG = dict(epochs=2, batch_size=GLOBAL_BATCH, lr=0.1, warmup_epochs=0.5, seed=4)


def train_toy(dist: DistContext) -> tuple[dict, list]:
    """Two epochs of a batch-norm network on generated data, in float64, as rank ``dist.rank``."""
    torch.set_num_threads(1)
    config = TrainConfig(**CONFIG)
    data = toy_dataset(96)
    seed_everything(config.seed)
    model = ToyNet(dropout=0.0).double()
    loader = BatchLoader(data, GLOBAL_BATCH // dist.world_size, shuffle=True, augment=True, seed=config.seed,
                         drop_last=True, rank=dist.rank, world_size=dist.world_size, dtype=torch.float64)
    test = BatchLoader(toy_dataset(40, seed=2, split="test"), 7, shuffle=False, rank=dist.rank,
                       world_size=dist.world_size, dtype=torch.float64)
    trainer = Trainer(model, ClassificationTask(4), config, len(loader), dist)
    history = trainer.fit(loader, test, show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, history


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist = init_distributed("cpu")
    try:
        state, history = train_toy(dist)
        if dist.is_main:
            torch.save({"state": state, "history": history}, out)
    finally:
        dist.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(out: str, attempts: int = 3) -> None:
    """Run ``_worker`` on 2 ranks. The port from ``free_port()`` is released before rank 0 binds it, so another
    process can take it in between (the one failure seen in about eight suite runs); a failed run is retried
    with a new port, and a real error fails every attempt and is raised."""
    for attempt in range(attempts):
        try:
            mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
            return
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == attempts - 1:
                raise


def test_two_processes_match_one_process(tmp_path):
    single, single_history = train_toy(DistContext())
    out = str(tmp_path / "rank0.pt")
    spawn_two_ranks(out)
    double = torch.load(out, weights_only=False)
    assert double["state"].keys() == single.keys()
    for k, v in single.items():
        if v.is_floating_point():
            torch.testing.assert_close(double["state"][k], v, rtol=1e-9, atol=1e-11, msg=k)
        else:
            assert torch.equal(double["state"][k], v), k
    for a, b in zip(single_history, double["history"]):  # metrics are summed over ranks: same numbers
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"])
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
    moved = any(not torch.equal(v, ToyNet(dropout=0.0).double().state_dict()[k]) for k, v in single.items())
    assert moved


def test_single_process_context_and_plain_batchnorm_behaviour(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    assert ctx.wrap(model) is model
    t = torch.ones(3)
    assert torch.equal(ctx.all_reduce_(t), torch.ones(3))

    # conversion keeps the state; without a process group GlobalBatchNorm2d is BatchNorm2d
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=None)).double()
    with torch.no_grad():
        ref[1].running_mean.fill_(0.3)
        ref[1].weight.uniform_()
    conv = sync_batchnorm(__import__("copy").deepcopy(ref))
    assert type(conv[1]) is GlobalBatchNorm2d and conv[1].running_mean.dtype == torch.float64
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(conv.state_dict()[k], v)


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent environment"),
                                          ({}, "unknown device")])
def test_bad_environment_or_device(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu" if env else "tpu-9000")


def cli_train_command(data_dir, out) -> list[str]:
    """``-m pdenet.cli train`` arguments of a short, comparable run (float32, 1 thread, 4 steps of batch 32)."""
    return ["-m", "pdenet.cli", "train", "--config", "lean-resnet20", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", "32", "--lr", "0.005", "--eval-batch-size", "32", "--threads", "1", "--no-progress",
            "--device", "cpu", "--out", str(out)]


def assert_same_run(one: dict, two: dict) -> None:
    """Two checkpoints of the same global-batch run, to the tolerance float32 rounding allows here (the reason is in
    ``test_torchrun_cli_two_processes_match_one_process``)."""
    assert one["model"].keys() == two["model"].keys()
    for k, v in one["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["model"][k], v, rtol=0, atol=2e-3, msg=k)
        else:
            assert torch.equal(two["model"][k], v), k
    assert one["history"][0]["test_loss"] == pytest.approx(two["history"][0]["test_loss"], rel=1e-3)


def test_two_nodes_on_loopback_match_one_process(fmnist_dir, tmp_path):
    """Two single-process "nodes" on this machine, joined by torchrun's c10d rendezvous on 127.0.0.1 (as
    ``torchrun --nnodes 2 --node-rank N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` on two machines), train the
    model of one process with the same global batch."""
    import subprocess
    import sys

    from pdenet.checkpoint import load_checkpoint

    one = subprocess.run([sys.executable, *cli_train_command(fmnist_dir, tmp_path / "one")], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    for attempt in range(3):  # the free port can be taken before the rendezvous binds it: retry with a new one
        port, out = free_port(), tmp_path / f"two-{attempt}"
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                   str(n), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id",
                                   f"pdenet-test-{attempt}", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                   *cli_train_command(fmnist_dir, out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
        outputs = [node.communicate(timeout=300) for node in nodes]
        if all(node.returncode == 0 for node in nodes):
            break
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err
    assert sum("cpu x2" in out for out, _ in outputs) == 1  # one rank reports, for a world of 2
    assert_same_run(load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt"))


def test_torchrun_cli_two_processes_match_one_process(fmnist_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m pdenet.cli train`` against the 1-process command, same global batch.

    In float32 this network's gradients carry relative rounding errors of about 1e-3 at initialisation (1 and 2
    threads in one process already differ by that much), so the comparison uses 4 small steps and a tolerance
    well below what per-process batch statistics give (about 1.6e-2 here without global batch norm).
    """
    import subprocess
    import sys

    from pdenet.checkpoint import load_checkpoint

    one = subprocess.run([sys.executable, *cli_train_command(fmnist_dir, tmp_path / "one")], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *cli_train_command(fmnist_dir, tmp_path / "two")], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert "cpu x2" in two.stdout and two.stdout.count("== lean-resnet20") == 1  # rank 0 reports
    assert_same_run(load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two"))


#: torchrun's worker: ``pdenet train`` (the arguments after the first) that, on the first attempt only, kills itself
#: with SIGKILL (as the out-of-memory killer or a failing machine would) right after its K-th mid-epoch checkpoint.
KILLED_WORKER = '''
import os
import signal
import sys

from pdenet.cli import main
from pdenet.training import Trainer

kill_after, attempt = int(sys.argv[1]), os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"attempt {attempt}", flush=True)
save, saved = Trainer.save, []


def save_then_die(self, path, meta):
    save(self, path, meta)
    if self.epoch_state is not None:  # a checkpoint inside an epoch
        saved.append(path)
        if len(saved) == kill_after and attempt == "0":
            os.kill(os.getpid(), signal.SIGKILL)


Trainer.save = save_then_die
sys.exit(main(sys.argv[2:]))
'''


def test_a_worker_killed_mid_epoch_is_restarted_and_ends_as_an_uninterrupted_run(fmnist_dir, tmp_path):
    """``torchrun --max-restarts 1`` with ``--checkpoint-every 3``: the worker kills itself right after its third
    mid-epoch checkpoint (epoch 2, batch 3 of 8), torchrun starts it again, the new worker resumes there by itself
    (``--resume auto`` is the default for a restarted worker) and ends with the weights, optimizer state and
    metrics of the same command run without a kill. The kill comes from the worker itself at a fixed point, so the
    test does not race the run."""
    import subprocess
    import sys

    from pdenet.checkpoint import load_checkpoint

    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)

    def torchrun(kill_after: int, out) -> subprocess.Popen:
        train = ["train", "--config", "lean-resnet20", "--override", "depths=(1, 1, 1)", "--override",
                 "widths=(4, 8, 8)", "--data-dir", str(fmnist_dir), "--epochs", "2", "--batch-size", "16",
                 "--eval-batch-size", "64", "--threads", "1", "--no-progress", "--device", "cpu",
                 "--checkpoint-every", "3", "--out", str(out)]
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "1", "--max-restarts", "1", "--monitor-interval", "0.1", str(script), str(kill_after),
                                 *train], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = {"straight": torchrun(0, tmp_path / "straight"), "killed": torchrun(3, tmp_path / "killed")}
    outputs = {name: run.communicate(timeout=300) for name, run in runs.items()}
    for name, run in runs.items():
        out, err = outputs[name]
        assert run.returncode == 0, f"{name} run failed ({run.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    out, err = outputs["killed"]
    log = f"torchrun's output:\n{out[-3000:]}\n{err[-3000:]}"
    assert "attempt 0" in out and "attempt 1" in out, f"the worker was not restarted; {log}"
    assert f"resuming {tmp_path / 'killed'} in epoch 2/2 after batch 3" in out, f"no mid-epoch resume; {log}"
    assert "attempt 1" not in outputs["straight"][0]
    straight, killed = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "killed"))
    assert straight["epoch"] == killed["epoch"] == 2 and killed.get("position") is None
    for k, v in straight["model"].items():
        assert torch.equal(killed["model"][k], v), f"{k} differs from the uninterrupted run's"
    for a, b in zip(straight["optimizer"]["state"].values(), killed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    for a, b in zip(straight["history"], killed["history"]):  # the epoch rows, without times and speeds
        assert [b[k] for k in ("lr", "lr_end", "train_loss", "train_accuracy", "test_accuracy")] == \
            [a[k] for k in ("lr", "lr_end", "train_loss", "train_accuracy", "test_accuracy")]
        # a fresh process's channels-last (oneDNN) evaluation can round differently in the 7th digit
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6)
