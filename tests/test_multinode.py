"""Several nodes, as two torchrun launchers on this machine (gloo on CPU) meeting at one c10d rendezvous, each
in its own working directory as on two machines: they train as one process does, only global rank 0 writes,
and SIGTERM on one node stops every rank at the same step with one checkpoint."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, children, ci_only, free_port, read_log, run_train, wait_for
from test_train import TINY, data  # noqa: F401 (data: the synthetic-shards fixture)
from train_gpt2 import DataLoaderLite

pytestmark = pytest.mark.slow

# The parallelisms every case runs under, each as the extra train_gpt2.py flags that choose it.
PARALLEL_FLAGS = [pytest.param([], id="ddp"), pytest.param(["--fsdp", "1"], id="fsdp")]


class TwoNodes:
    """Two `torchrun --nnodes 2 --nproc_per_node 1` launchers, started in tmp_path/node0 and tmp_path/node1;
    their stdout and stderr go to tmp_path/nodeN.out and .err. Node 0 starts first and hosts the rendezvous,
    as the node named by --rdzv-endpoint does. c10d numbers the nodes itself (by host name, then launcher pid;
    --node-rank is for the static rendezvous only), so which node runs global rank 0 is read from the output.
    On exit, whatever still runs is killed."""

    def __init__(self, tmp_path, *args):
        self.tmp_path, self.procs = tmp_path, []
        port = free_port()
        for node in range(2):
            cwd = tmp_path / f"node{node}"
            cwd.mkdir()
            with open(tmp_path / f"node{node}.out", "w") as out, \
                    open(tmp_path / f"node{node}.err", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     os.path.join(REPO, "train_gpt2.py"), *map(str, args)],
                    cwd=cwd, stdout=out, stderr=err))
            if node == 0:
                wait_for(lambda: self.listening(port), 60, f"rendezvous on port {port}")

    def listening(self, port):
        assert self.procs[0].poll() is None, self.output(0)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def output(self, node, kind="out"):
        return (self.tmp_path / f"node{node}.{kind}").read_text()

    def wait(self, node, timeout=600):
        return self.procs[node].wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                for pid in children(proc):  # torchrun starts each worker in a session of its own
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("flags", [PARALLEL_FLAGS[0],
                                   pytest.param(["--fsdp", "1"], id="fsdp", marks=ci_only)])
def test_two_nodes_train_like_one_process_and_only_rank_0_writes(data, tmp_path, flags):  # noqa: F811
    args = [*TINY, "--max_steps", 5, "--ckpt_interval", 4, "--micro_batch_size", 2, "--total_batch_size", 256]
    log_dir = tmp_path / "log"
    with TwoNodes(tmp_path, "--data_dir", data, "--log_dir", log_dir, *args, *flags) as nodes:
        for node in range(2):
            assert nodes.wait(node) == 0, nodes.output(node, "err")[-3000:]
    # One plain process (FSDP needs ranks), measuring the same val tokens as the 2 ranks
    run_train("--data_dir", data, "--log_dir", tmp_path / "single", *args)

    two, one = read_log(log_dir), read_log(tmp_path / "single")
    assert sorted(two["train"]) == list(range(5))
    for step in range(5):
        assert two["train"][step] == pytest.approx(one["train"][step], abs=2e-4)
    assert two["val"] == pytest.approx(one["val"], abs=2e-4)
    a = torch.load(log_dir / "model_00005.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "model_00005.pt", weights_only=True)
    assert a["loader_position"] == b["loader_position"] == [0, 0, 20 * 64]  # 5 steps x 2 x 2 micro-batches
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=1e-3)

    # Rank 0 alone wrote: one log.txt without a repeated line, checkpoints in log_dir, nothing in either
    # launcher's working directory (no relative log/ there), and only its node printed the run.
    assert sorted(os.listdir(log_dir)) == [".lock", "log.txt", "loss.png", "model_00004.pt", "model_00005.pt",
                                           "report.md"]
    lines = (log_dir / "log.txt").read_text().splitlines()
    # the attempt's line, train and time at steps 0-4, val at 0, 4 (interval) and 5 (end), the end's time
    assert len(lines) == len(set(lines)) == 1 + 5 + 5 + 3 + 1
    assert [ln.split()[1] for ln in lines].count("time") == 6
    assert os.listdir(tmp_path / "node0") == [] and os.listdir(tmp_path / "node1") == []
    printed = ["wrote " in nodes.output(node) for node in range(2)]
    assert sorted(printed) == [False, True], "exactly one node runs global rank 0 and prints"
    assert "step " not in nodes.output(printed.index(False))


@pytest.mark.parametrize("target", ["worker", "launcher"])
@pytest.mark.parametrize("flags", [PARALLEL_FLAGS[0],
                                   pytest.param(["--fsdp", "1"], id="fsdp", marks=ci_only)])
def test_sigterm_on_one_node_stops_every_rank_at_one_step_with_one_checkpoint(data, tmp_path,  # noqa: F811
                                                                              flags, target):
    """SIGTERM to node 1's worker (its training process), or to node 1's launcher, which sends it on to the
    worker. The rank that gets it finishes its step; the stop flag, all-reduced with the step's loss, stops
    every other rank after that same step, and rank 0 writes one checkpoint."""
    log_file = tmp_path / "log" / "log.txt"
    with TwoNodes(tmp_path, "--data_dir", data, "--log_dir", tmp_path / "log", *TINY, "--max_steps", 1000,
                  "--ckpt_interval", 1000, *flags) as nodes:
        wait_for(lambda: log_file.exists() and log_file.read_text().count(" train ") >= 3, 600,
                 "3 train steps")
        worker, = children(nodes.procs[1])
        os.kill(nodes.procs[1].pid if target == "launcher" else worker, signal.SIGTERM)
        if target == "worker":
            for node in range(2):  # both launchers see their worker exit 0, and exit 0 too
                assert nodes.wait(node) == 0, nodes.output(node, "err")[-3000:]
        else:
            # torchrun counts a signal to itself as a failure: it stops its worker with SIGTERM
            # (SIGKILL only after --shutdown-timeout, 30 s) and exits 1.
            assert nodes.wait(1) == 1
            assert "SignalException" in nodes.output(1, "err") and "SIGKILL" not in nodes.output(1, "err")
            wait_for(lambda: children(nodes.procs[0]) == [], 60, "exit of node 0's worker")
            # Node 0's launcher now waits at torchrun's exit barrier for node 1's, which never comes:
            # 5 minutes, in a store wait that a SIGTERM does not interrupt. The test kills it
            # (docs/checkpoints.md: signal every node, or the training processes).
            assert nodes.procs[0].poll() is None
        stdout = nodes.output(0) + nodes.output(1)

    ckpts = sorted(n for n in os.listdir(tmp_path / "log") if n.endswith(".pt"))
    assert len(ckpts) == 1, ckpts
    step = int(ckpts[0][6:11])
    assert 3 <= step < 1000
    assert sorted(read_log(tmp_path / "log")["train"]) == list(range(step))
    # The data position: each rank read `step` micro-batches of 4x32.
    first_unread = DataLoaderLite(str(data), "train", 4, 32, vocab_size=256).locate(2 * step)
    assert torch.load(tmp_path / "log" / ckpts[0], weights_only=True)["loader_position"] == list(first_unread)
    assert stdout.count("stop requested") == 1
