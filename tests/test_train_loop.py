"""run_sft: exact resume (after an exception and after SIGKILL), non-finite stop, bad checkpoint."""

import functools
import os
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params
from ideal_jax.train import Checkpointer, NonFiniteLossError, run_sft
from ideal_jax.train.metrics import DETERMINISTIC_FIELDS, read_metrics
from ideal_jax.utils.errors import InputError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)
DOMAINS = ("math", "code", "chat")
STEPS_PER_EPOCH = 5
MESH_SHAPE = (2, 2, 2)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CRASH_AT = 8  # global batch index at which the interrupted runs die (epoch 1, batch 3)


def train_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        learning_rate=1e-3,
        warmup_steps=2,
        schedule="cosine",
        end_lr_fraction=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        grad_accum=2,
        batch_size=16,
        seq_len=16,
        epochs=2,
        log_every=1,
        checkpoint_every=3,  # the crash lands between checkpoints: steps 7-8 are redone
        keep_checkpoints=2,
        seed=0,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def synthetic_batch(seed: int, rows: int = 16, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Two packed prompt+response examples per row, then padding; domains drawn per example."""
    rng = np.random.default_rng(seed)
    batch = {
        "tokens": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "weights": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "domain_ids": np.full((rows, seq_len), -1, np.int32),
    }
    for r in range(rows):
        start = 0
        for segment in (1, 2):
            length = int(rng.integers(3, seq_len // 2))
            prompt = int(rng.integers(1, length))
            span = slice(start, start + length)
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(length)
            batch["domain_ids"][r, span] = rng.integers(0, len(DOMAINS))
            batch["weights"][r, start + prompt : start + length] = 1.0
            start += length
    return batch


def batches_for_epoch(epoch: int, *, die_at: int | None = None, how: str = "raise"):
    """Deterministic batches; at global index `die_at` raise or SIGKILL this very process."""
    for index in range(STEPS_PER_EPOCH):
        global_index = epoch * STEPS_PER_EPOCH + index
        if global_index == die_at:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"simulated crash at batch {global_index}")
        yield synthetic_batch(global_index)


@functools.cache
def _host_params():
    """Starting parameters (the "existing params" path of run_sft), made once per process."""
    return jax.device_get(jax.jit(functools.partial(init_params, CFG))(jax.random.key(0)))


def _train(workdir, die_at=None, how="raise", cfg=CFG, **overrides):
    return run_sft(
        cfg,
        train_config(**overrides),
        sharding.make_mesh(MESH_SHAPE),
        workdir,
        functools.partial(batches_for_epoch, die_at=die_at, how=how),
        STEPS_PER_EPOCH,
        init_params=_host_params(),
        domain_names=DOMAINS,
        progress=False,
        compiler_options=FAST_COMPILE,
    )


def subprocess_main(workdir: str, die_at: int) -> None:
    """Entry point of the child process: same flags as conftest, then train until SIGKILL."""
    jax.config.update("jax_default_matmul_precision", "highest")
    _train(workdir, die_at=die_at, how="kill")


CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,  # set by the fixture
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every run here compiles the same step: a persistent compilation cache (shared with the
    child process) turns all compiles after the first into loads. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    options = dict(CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("xla")))
    previous = {name: getattr(jax.config, name) for name in options}
    cc.reset_cache()  # the cache is set up once per process: make it re-read the options
    for name, value in options.items():
        jax.config.update(name, value)
    yield options
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    params, summary = _train(workdir)
    return workdir, jax.device_get(params), summary


def _curve(workdir):
    entries = read_metrics(workdir / "metrics.jsonl")
    return [{k: e[k] for k in DETERMINISTIC_FIELDS} for e in entries]


def _assert_same_run(workdir, params, reference):
    ref_dir, ref_params, _ = reference
    assert _curve(workdir) == _curve(ref_dir)  # exact: same steps, losses, lr, grad norms
    assert [e["step"] for e in _curve(workdir)] == list(range(1, 11))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref_params)


def test_uninterrupted_run_logs_every_step(reference):
    workdir, _, summary = reference
    curve = read_metrics(workdir / "metrics.jsonl")
    assert [e["step"] for e in curve] == list(range(1, 11))
    assert set(curve[0]["domain_losses"]) == set(DOMAINS)
    assert all(np.isfinite(e["loss"]) and e["lr"] > 0 for e in curve)
    assert all(e["tokens_per_s"] > 0 and e["examples_per_s"] > 0 for e in curve)
    assert summary["final_step"] == 10 and summary["compile_seconds"] > 0
    assert os.listdir(workdir / "tb")
    ckpt = Checkpointer(workdir / "checkpoints", save_every=3, keep=2)
    assert ckpt.all_steps() == [9, 10]
    ckpt.close()


def test_resume_after_exception_is_exact(reference, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, die_at=CRASH_AT)
    assert [e["step"] for e in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    params, summary = _train(tmp_path)  # resumes from step 6, redoes 7-8 without duplicates
    assert summary["start_step"] == 6
    _assert_same_run(tmp_path, params, reference)
    # A finished workdir: nothing to do, same parameters back.
    again, summary = _train(tmp_path)
    assert summary["start_step"] == 10
    _assert_same_run(tmp_path, again, reference)


def test_resume_after_sigkill_is_exact(reference, compilation_cache, tmp_path):
    """SIGKILL right after step 6 asked for its (asynchronous) checkpoint: the save is usually
    still being written, so the restart finds an unfinished temporary directory."""
    code = (
        f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_train_loop as t; "
        f"t.subprocess_main({str(tmp_path)!r}, 6)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"  # XLA_FLAGS (8 devices) is inherited from conftest
    env.update({name.upper(): str(value) for name, value in compilation_cache.items()})
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    print("after the kill:", sorted(os.listdir(tmp_path / "checkpoints")))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=3, keep=2)
    assert ckpt.latest_step() in (3, 6)  # the save at 6 may not have committed before the kill
    ckpt.close()
    params, _ = _train(tmp_path)
    _assert_same_run(tmp_path, params, reference)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(epoch):
        for index, batch in enumerate(batches_for_epoch(epoch)):
            if epoch == 0 and index == 4:
                batch["weights"][0, -1] = np.nan
            yield batch

    # Random initialisation from train.seed here (the other runs start from given parameters).
    with pytest.raises(NonFiniteLossError, match=r"update 5 \(epoch 0, batch 4") as err:
        run_sft(
            CFG,
            train_config(checkpoint_every=2, log_every=2),
            sharding.make_mesh(MESH_SHAPE),
            tmp_path,
            poisoned,
            STEPS_PER_EPOCH,
            domain_names=DOMAINS,
            progress=False,
            compiler_options=FAST_COMPILE,
        )
    assert isinstance(err.value, InputError)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=2, keep=2)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    assert [e["step"] for e in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4]


def test_checkpoint_of_another_model_is_an_input_error(reference):
    workdir, _, _ = reference
    wider = CFG.replace(intermediate_size=96)
    with pytest.raises(InputError, match=r"checkpoints/10.*layers\.0\.mlp\.down_proj\.kernel"):
        _train(workdir, cfg=wider)
    assert [e["step"] for e in read_metrics(workdir / "metrics.jsonl")][-1] == 10


def _largest_state_file(step_dir):
    files = [
        os.path.join(d, n)
        for d, _, names in os.walk(os.path.join(step_dir, "state"))
        for n in names
    ]
    return max(files, key=os.path.getsize)


def _state_data_files(step_dir):
    return [
        os.path.join(d, n)
        for d, _, names in os.walk(os.path.join(step_dir, "state"))
        if os.path.basename(d) == "d"
        for n in names
    ]


@pytest.mark.parametrize("damage", ["flip_bits", "truncate", "delete", "delete_undigested"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one(reference, tmp_path, damage):
    ref_dir, _, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=3, keep=2)
    steps = ckpt.all_steps()
    assert len(steps) == 2 and all(ckpt.verify(s) is None for s in steps)  # digests recorded
    ckpt.close()
    latest = workdir / "checkpoints" / str(steps[-1])
    target = _largest_state_file(latest)
    if damage == "flip_bits":
        data = bytearray(open(target, "rb").read())
        for i in range(5):
            data[len(data) // 2 + 7 * i] ^= 0x10
        open(target, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    elif damage == "delete_undigested":  # killed between commit and digest: restore must fail
        os.remove(str(workdir / "checkpoints") + f".digests/{steps[-1]}.json")
        # Every OCDBT data file goes: which single file holds the arrays depends on the timing of
        # orbax's manifest merge (a CI run restored step 10 with only the largest file removed).
        data_files = _state_data_files(latest)
        assert data_files
        for path in data_files:
            os.remove(path)
    else:
        os.remove(target)
    params, summary = _train(workdir)
    assert summary["start_step"] == steps[0]  # the older, valid step
    _assert_same_run(workdir, params, reference)  # and the redone steps are exact
    damaged = os.listdir(str(workdir / "checkpoints") + ".damaged")
    assert len(damaged) == 1 and damaged[0].startswith(f"{steps[-1]}-")  # set aside, not deleted


def test_every_checkpoint_damaged_is_an_input_error_naming_the_directory(reference, tmp_path):
    ref_dir, _, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            os.remove(_largest_state_file(step_dir))
    with pytest.raises(InputError, match=r"none of the 2 checkpoints is valid") as err:
        _train(workdir)
    assert str(workdir / "checkpoints") in str(err.value)


def test_divergence_is_named_at_training():
    from ideal_jax.train.loop import DivergedError, check_divergence

    ln_v = float(np.log(128))
    good = [{"step": s, "loss": ln_v - 0.05 * s} for s in range(2, 42, 2)]
    check_divergence(good, 128, "w")  # learning: fine
    check_divergence(good[:3], 128, "w")  # too short to judge
    slow = [{"step": s, "loss": 1.2 - 1e-4 * s} for s in range(2, 42, 2)]
    check_divergence(slow, 128, "w")  # a pretrained model at a tiny learning rate: fine
    # Measured: tiny config at lr 1e6 logs 4.645, 4.635, 4.635, 4.635 (ln V = 4.852).
    collapsed = [{"step": s, "loss": v} for s, v in zip((2, 4, 6, 8), (4.645, 4.635, 4.635, 4.635))]
    with pytest.raises(DivergedError, match=r"update 4.*learning_rate"):
        check_divergence(collapsed, 128, "w")
    blown = [{"step": s, "loss": 1.0 if s < 20 else 2.0 + ln_v * 0.2} for s in range(2, 42, 2)]
    with pytest.raises(DivergedError, match=r"update 20"):
        check_divergence(blown, 128, "w")
