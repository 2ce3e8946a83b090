"""Multi-worker training on real processes: two `python -m toex_tf.run` workers on
loopback addresses with a `TF_CONFIG` cluster, under `MultiWorkerMirroredStrategy`.

Checked against what TF's multi-worker guide promises: both workers end with the same
weights, the loss is a single worker's on the same global batch, only the chief writes
into the output directory, and a run whose worker is killed resumes from the chief's last
checkpoint to the weights of a run that was never interrupted.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_runner import LLAMA_TINY, run_cli, write_corpus

GPT = [
    "--mode=train",
    "--preset=tiny",
    "--tokenizer=byte",
    "--seq_len=16",
    "--batch_size=4",  # the global batch: 2 windows per worker
    "--train_steps=30",
    "--warmup_steps=2",
    "--checkpoint_every=5",
    "--nojit_compile",  # as the workers run; XLA compiles for one device only
    "--verbosity=-1",
]
LLAMA = [*LLAMA_TINY, "--checkpoint_every=3", "--verbosity=-1"]
TRAINED = re.compile(r"Trained to step (\d+): loss ([0-9.]+), weights sha256 ([0-9a-f]{64})")
PHASE = re.compile(r"Phase (\w+) trained to step (\d+): weights sha256 ([0-9a-f]{64})")
TIMEOUT = 300  # seconds a worker may run: a hung collective fails the test, not CI


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(args, count=2, worker_args=()):
    """Starts `count` workers of one cluster; returns the `Popen`s, chief (worker 0) first.
    `worker_args[i]`, when given, is added to worker `i`'s arguments."""
    addresses = [f"localhost:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        extra = list(worker_args[index]) if index < len(worker_args) else []
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(config)}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "toex_tf.run", *args, *extra, "--strategy=multi_worker"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    return processes


def _wait(processes, timeout=TIMEOUT):
    """Waits for every worker (all killed past `timeout`); returns their outputs."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"a worker ran past {timeout} s: {[p.args for p in processes]}")
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def _run_cluster(args, count=2):
    return _wait(_start_workers(args, count))


def _worker_dirs(output):
    return re.findall(r"writes to its temporary directory (\S+) \(removed at exit\)", output)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return "--dataset=text:" + write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def two_worker_gpt(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_cluster")
    return out, _run_cluster([*GPT, corpus, f"--output_dir={out}"])


def test_two_gpt_workers_train_one_model_and_only_the_chief_writes(
    two_worker_gpt, corpus, tmp_path
):
    out, (chief, worker) = two_worker_gpt
    chief_line, worker_line = TRAINED.search(chief), TRAINED.search(worker)
    assert chief_line and worker_line, (chief[-2000:], worker[-2000:])
    assert chief_line.group(3) == worker_line.group(3)  # identical weights
    # The same global batch on one worker: the same loss, nearly the same weights (the
    # gradient is summed in another order).
    single = run_cli(*GPT, corpus, f"--output_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    single_line = TRAINED.search(single.stdout)
    assert single_line.group(1) == chief_line.group(1) == "30"
    assert float(chief_line.group(2)) == pytest.approx(float(single_line.group(2)), rel=1e-3)
    import toex_tf  # noqa: PLC0415 - TensorFlow, after the workers ran

    cluster_model = toex_tf.load(str(out)).model
    single_model = toex_tf.load(str(tmp_path / "single")).model
    for a, b in zip(cluster_model.get_weights(), single_model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-2)
    # The chief wrote the run; the worker wrote only into its own temporary directory,
    # which it removed.
    assert sorted(os.listdir(out / "checkpoints")) == [
        "ckpt-00000020",
        "ckpt-00000025",
        "ckpt-00000030",
    ]
    assert (out / "model.keras").exists() and (out / "tensorboard").is_dir()
    assert len((out / "config_log.jsonl").read_text().splitlines()) == 1
    assert _worker_dirs(chief) == []
    (worker_dir,) = _worker_dirs(worker)
    assert not os.path.exists(worker_dir)
    assert "Not the chief: the chief saves the model." in worker


def test_workers_with_different_data_refuse_to_train(tmp_path):
    first = write_corpus(tmp_path / "first", docs=12)
    second = write_corpus(tmp_path / "second", docs=13)  # a worker with another copy
    processes = _start_workers(
        [*GPT, f"--output_dir={tmp_path / 'out'}"],
        worker_args=[[f"--dataset=text:{first}"], [f"--dataset=text:{second}"]],
    )
    deadline = time.monotonic() + TIMEOUT
    outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode != 0, output[-2000:]
        assert "the workers prepared different runs" in output, output[-2000:]
        assert "Traceback" not in output
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_killed_worker_resumes_from_the_chief_checkpoint_to_the_same_weights(
    two_worker_gpt, corpus, tmp_path
):
    _, (uninterrupted, _) = two_worker_gpt
    out = tmp_path / "killed"
    args = [*GPT, corpus, f"--output_dir={out}"]
    chief, worker = _start_workers(args)
    # Kill the worker mid-run, once the chief has written its first checkpoint.
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "ckpt-00000005").exists():
        assert time.monotonic() < deadline and chief.poll() is None, "no checkpoint written"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # The chief cannot go on alone: it fails or hangs in a collective; stop it too.
    try:
        chief.wait(timeout=30)
    except subprocess.TimeoutExpired:
        chief.kill()
        chief.wait()
    assert not (out / "model.keras").exists()  # the run did not finish
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    last = int(checkpoints[-1].split("-")[1].split(".")[0])
    assert last < 30
    resumed = _run_cluster(args)
    for output in resumed:
        assert f"Resumed from {out / 'checkpoints' / f'ckpt-{last:08d}'} at step {last}" in output
    digests = {TRAINED.search(output).group(3) for output in resumed}
    assert digests == {TRAINED.search(uninterrupted).group(3)}


def test_two_llama_workers_train_the_phases_then_one_process_goes_on(corpus, tmp_path):
    """Base and routers by two workers; the exits phase and the quality table after them
    in one process (the CLI's Llama phases end to end)."""
    base, routed = tmp_path / "base", tmp_path / "routed"
    outputs = _run_cluster(
        [*LLAMA, corpus, "--phase=base", "--train_steps=6", f"--output_dir={base}"]
    )
    digests = [PHASE.search(output).group(3) for output in outputs]
    assert digests[0] == digests[1]
    losses = [json.loads(re.search(r"phase base: (\{.*\})", o).group(1))["loss"] for o in outputs]
    single = run_cli(
        *LLAMA, corpus, "--phase=base", "--train_steps=6", f"--output_dir={tmp_path / 'single'}"
    )
    assert single.returncode == 0, single.stderr[-3000:]
    single_loss = json.loads(re.search(r"phase base: (\{.*\})", single.stdout).group(1))["loss"]
    assert losses[0] == pytest.approx(single_loss, rel=1e-3)
    assert (base / "hf" / "config.json").exists() and (base / "hf" / "model.safetensors").exists()
    assert sorted(os.listdir(base / "checkpoints" / "base")) == ["ckpt-00000003", "ckpt-00000006"]
    outputs = _run_cluster(
        [
            *LLAMA,
            corpus,
            "--phase=routers",
            "--capacity=0.5",
            "--train_steps=8",
            f"--init_from={base / 'hf'}",
            f"--output_dir={routed}",
        ]
    )
    digests = [PHASE.search(output).group(3) for output in outputs]
    assert digests[0] == digests[1]
    assert (routed / "model.keras").exists()
    assert not (routed / "hf").exists()  # only the base phase exports a HF checkpoint
    result = run_cli(
        *LLAMA,
        corpus,
        "--phase=exits",
        "--train_steps=4",
        f"--init_from={routed / 'model.keras'}",
        f"--output_dir={routed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(
        *LLAMA,
        corpus,
        "--mode=eval",
        "--exit_depth=1.5",
        "--llama_capacities=0.5",
        f"--output_dir={routed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((routed / "llama_results.json").read_text())["rows"]
    assert [(r["capacity"], r["exits"]) for r in rows] == [(1.0, False), (0.5, False), (0.5, True)]
    for row in rows[1:]:
        assert row["perplexity"] > 0 and "perplexity_increase" in row
        assert row["measured_speedup"] > 0 and row["counted_speedup"] > 0
